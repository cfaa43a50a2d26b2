import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from clipkd.evaluation import metrics


def test_per_class_accuracy_matches_sklearn_on_each_subset():
    rng = np.random.default_rng(0)
    C, N = 10, 500
    seen = np.zeros(C, bool)
    seen[:6] = True
    labels = rng.integers(0, C, N)
    scores = rng.normal(size=(N, C)) + 1.5 * np.eye(C)[labels]
    pred = scores.argmax(1)
    g = metrics.gzsl(scores, labels, seen)
    on_seen = seen[labels]
    with np.errstate(all="ignore"):
        import warnings

        warnings.simplefilter("ignore")
        s_ref = balanced_accuracy_score(labels[on_seen], pred[on_seen])
        u_ref = balanced_accuracy_score(labels[~on_seen], pred[~on_seen])
    assert g.S == pytest.approx(s_ref)
    assert g.U == pytest.approx(u_ref)
    assert g.H == pytest.approx(2 * s_ref * u_ref / (s_ref + u_ref))


def test_harmonic_mean_by_hand():
    assert metrics.harmonic_mean(1.0, 1.0) == 1.0
    assert metrics.harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert metrics.harmonic_mean(0.9, 0.0) == 0.0
    assert metrics.harmonic_mean(0.0, 0.0) == 0.0


def test_gzsl_hand_case_and_calibration():
    # 2 seen classes (0,1), 1 unseen (2). Unseen images score highest on a seen class by a margin 0.1.
    seen = np.array([True, True, False])
    scores = np.array([[0.9, 0.1, 0.2],   # label 0 -> right
                       [0.1, 0.9, 0.3],   # label 1 -> right
                       [0.6, 0.1, 0.5],   # label 2 -> wrong (seen 0 wins by 0.1)
                       [0.1, 0.55, 0.5]])  # label 2 -> wrong (seen 1 wins by 0.05)
    labels = np.array([0, 1, 2, 2])
    g = metrics.gzsl(scores, labels, seen)
    assert (g.S, g.U, g.H) == (1.0, 0.0, 0.0)
    g = metrics.gzsl(scores, labels, seen, gamma=0.2)  # seen scores lowered: unseen images now right
    assert (g.S, g.U) == (1.0, 1.0)
    g = metrics.gzsl(scores, labels, seen, gamma=0.07)  # only the 0.05 margin flips
    assert (g.S, g.U) == (1.0, 0.5)
    gamma = metrics.choose_gamma(scores, labels, seen)
    assert metrics.gzsl(scores, labels, seen, gamma).H == 1.0


def test_curve_endpoints_and_ausuc():
    rng = np.random.default_rng(1)
    C, N = 6, 300
    seen = np.array([True] * 4 + [False] * 2)
    labels = rng.integers(0, C, N)
    scores = rng.normal(size=(N, C)) + 3 * np.eye(C)[labels]
    gammas, S, U = metrics.seen_unseen_curve(scores, labels, seen)
    assert U[0] == 0.0 and S[-1] == 0.0  # all predicted seen / all predicted unseen
    # the ends equal the seen-only / unseen-only accuracies
    on_seen = seen[labels]
    s_only = metrics.per_class_accuracy(np.where(seen, scores, -np.inf)[on_seen].argmax(1), labels[on_seen])
    assert S[0] == pytest.approx(s_only)
    a = metrics.ausuc(S, U)
    assert 0.5 < a <= 1.0
    # a perfect scorer has AUSUC 1
    perfect = np.eye(C)[labels] * 10
    _, S2, U2 = metrics.seen_unseen_curve(perfect, labels, seen)
    assert metrics.ausuc(S2, U2) == pytest.approx(1.0)


def test_classifier_with_no_unseen_scores_gets_u_zero():
    seen = np.array([True, True, False])
    scores = np.array([[1.0, 0.0, -np.inf], [0.0, 1.0, -np.inf], [0.3, 0.2, -np.inf]])
    labels = np.array([0, 1, 2])
    assert metrics.gzsl(scores, labels, seen, gamma=5.0).U == 0.0
    _, S, U = metrics.seen_unseen_curve(scores, labels, seen)
    assert U.max() == 0.0


def test_topk():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = np.array([2, 0])
    assert metrics.topk_accuracy(scores, labels, 1) == 0.5
    assert metrics.topk_accuracy(scores, labels, 2) == 1.0
