"""Distillation losses and retrieval metrics, checked against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipkd.errors import ClipkdError
from clipkd.evaluation.retrieval import image_image_metrics, labels_from_paths, text_image_recall
from clipkd.students.losses import KD_LOSSES, affinity_loss, kd_loss


def test_cosine_and_mse_by_hand():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # normalised rows: (0.6, 0.8), (1, 0)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert kd_loss("cosine", s, t).item() == pytest.approx(((1 - 0.6) + 0) / 2)
    assert kd_loss("mse", s, t).item() == pytest.approx(((0.4**2 + 0.8**2) + 0) / 2)


def test_affinity_by_hand():
    # student and teacher agree on image 0 and disagree on image 1 (2 images, 2 texts)
    s_img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s_txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t_txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    value = affinity_loss(s_img, s_txt, t_img, t_txt, 1.0, 1.0).item()

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    e = math.e
    hi, lo = e / (e + 1), 1 / (e + 1)
    # image→text rows: teacher [hi, lo], [lo, hi]; student [hi, lo], [hi, lo]
    i2t = (kl([hi, lo], [hi, lo]) + kl([lo, hi], [hi, lo])) / 2
    # text→image rows (columns of the logits): teacher [hi, lo], [lo, hi]; student [.5, .5], [.5, .5]
    t2i = (kl([hi, lo], [0.5, 0.5]) + kl([lo, hi], [0.5, 0.5])) / 2
    assert value == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_losses_zero_when_student_equals_teacher():
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    for name in KD_LOSSES:
        assert kd_loss(name, 3 * img, img, txt, txt, 50.0, 50.0).item() == pytest.approx(0.0, abs=1e-5)


def test_affinity_allows_different_sizes():
    loss = kd_loss("affinity", torch.randn(4, 8), torch.randn(4, 16), torch.randn(4, 8), torch.randn(4, 16))
    assert loss.item() > 0


def test_gradient_reaches_student_never_teacher():
    s_img, s_txt = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    t_img, t_txt = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    for name in KD_LOSSES:
        for x in (s_img, s_txt, t_img, t_txt):
            x.grad = None
        kd_loss(name, s_img, t_img, s_txt, t_txt).backward()
        assert s_img.grad is not None and s_img.grad.abs().sum() > 0
        assert t_img.grad is None and t_txt.grad is None
    with pytest.raises(ClipkdError, match="affinity loss needs"):
        kd_loss("affinity", s_img, t_img)
    with pytest.raises(ClipkdError, match="unknown distillation loss"):
        kd_loss("kl", s_img, t_img)


def test_text_image_recall_by_hand():
    img = torch.eye(3)
    # texts 0,1 belong to image 0; text 2 to image 1; text 3 to image 2
    txt = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    r = text_image_recall(img, txt, [0, 0, 1, 2], ks=(1, 2))
    # text→image top-1: t0→img0 ✓, t1→img1 ✗ (owner 0), t2→img1 ✓, t3→img2 ✓ ; top-2: t1 → [1, 2] ✗
    assert r["t2i_r@1"] == pytest.approx(3 / 4)
    assert r["t2i_r@2"] == pytest.approx(3 / 4)
    # image→text top-1: img0→t0 ✓, img1→t1 or t2 (t2 larger: 1.0 vs 0.98) ✓, img2→t3 ✓
    assert r["i2t_r@1"] == pytest.approx(1.0)
    assert r["mean_recall"] == pytest.approx((0.75 + 0.75 + 1 + 1) / 4)


def test_image_image_metrics_by_hand():
    # 1-d embeddings on a circle: angles determine the ranking exactly
    angles = torch.tensor([0.0, 0.1, 0.3, 0.35, 1.0])
    emb = torch.stack([angles.cos(), angles.sin()], 1)
    labels = [0, 1, 0, 1, 0]
    r = image_image_metrics(emb, labels, ks=(1, 2), map_k=3)
    # rankings (query excluded): q0: 1,2,3,4  q1: 0,2,3,4 (0.1 vs 0.2 vs 0.25)  q2: 3,1,0,4  q3: 2,1,0,4
    # q4: 3,2,1,0. Relevance: q0 [0,1,0,1] q1 [0,0,1,0] q2 [0,0,1,1] q3 [0,1,0,0] q4 [0,1,0,1]
    assert r["i2i_r@1"] == pytest.approx(0.0)
    assert r["i2i_r@2"] == pytest.approx(3 / 5)
    # AP@3 = sum P@k*rel_k / min(3, n_relevant); n_relevant: label0 -> 2, label1 -> 1
    ap = [(1 / 2) / 2, (1 / 3) / 1, (1 / 3) / 2, (1 / 2) / 1, (1 / 2) / 2]
    assert r["i2i_map@3"] == pytest.approx(sum(ap) / 5)
    assert r["i2i_queries"] == 5


def test_image_image_skips_queries_without_match():
    emb = F.normalize(torch.randn(4, 3), dim=-1)
    r = image_image_metrics(emb, [0, 0, 1, 2])
    assert r["i2i_queries"] == 2 and r["i2i_queries_without_match"] == 2
    assert r["i2i_r@10"] == pytest.approx(1.0)  # the one match is always among the 3 other images
    with pytest.raises(ClipkdError, match="at least two images"):
        image_image_metrics(emb, [0, 1, 2, 3])


def test_labels_from_paths():
    assert labels_from_paths(["b/1.jpg", "a/2.jpg", "b/3.jpg"]) == ([1, 0, 1], ["a", "b"])
    assert labels_from_paths(["1.jpg", "a/2.jpg"]) is None
