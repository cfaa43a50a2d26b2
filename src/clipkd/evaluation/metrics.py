"""Generalized zero-shot metrics (Xian et al., 2018) and calibrated stacking (Chao et al., 2016).

``scores`` is an (N, C) array over *all* classes; ``labels`` (N,) index the same classes;
``seen`` is a boolean (C,) mask. S and U are per-class mean top-1 accuracies on the test images
of seen and unseen classes respectively, predicting over all classes; H = 2SU / (S + U).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ClipkdError


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the fraction of their images predicted right."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    classes = np.unique(labels)
    correct = np.asarray(pred) == labels
    return float(np.mean([correct[labels == c].mean() for c in classes]))


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose label is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(1).mean())


def harmonic_mean(s: float, u: float) -> float:
    """H = 2SU/(S+U), 0 when both are 0."""
    return 0.0 if s + u == 0 else 2 * s * u / (s + u)


@dataclass
class GZSL:
    """S, U, H at one calibration ``gamma``."""

    S: float
    U: float
    H: float
    gamma: float = 0.0


def gzsl(scores: np.ndarray, labels: np.ndarray, seen: np.ndarray, gamma: float = 0.0) -> GZSL:
    """S, U and H after subtracting ``gamma`` from every seen class's score (calibrated stacking)."""
    seen = np.asarray(seen, dtype=bool)
    pred = np.argmax(scores - gamma * seen[None, :], axis=1)
    on_seen = seen[labels]
    s = per_class_accuracy(pred[on_seen], labels[on_seen])
    u = per_class_accuracy(pred[~on_seen], labels[~on_seen])
    return GZSL(s, u, harmonic_mean(s, u), gamma)


def seen_unseen_curve(scores: np.ndarray, labels: np.ndarray, seen: np.ndarray,
                      max_points: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gammas, S, U) over every calibration that changes a prediction, from all-seen to all-unseen.

    Each image is predicted as its best seen class when ``best_seen - best_unseen >= gamma``, else
    its best unseen class; so the curve only changes at those per-image gaps.
    """
    seen = np.asarray(seen, dtype=bool)
    s_scores = np.where(seen[None, :], scores, -np.inf)
    u_scores = np.where(~seen[None, :], scores, -np.inf)
    best_s, best_u = s_scores.argmax(1), u_scores.argmax(1)
    gap = s_scores.max(1) - u_scores.max(1)
    finite = np.unique(gap[np.isfinite(gap)])
    if finite.size > max_points:
        finite = np.quantile(finite, np.linspace(0, 1, max_points))
    # Just above each gap flips that image to unseen; -inf keeps everything seen, +inf flips all.
    eps = 1e-9 * (1 + np.abs(finite))
    gammas = np.concatenate([[-np.inf], finite + eps, [np.inf]])
    on_seen = seen[labels]
    S, U = np.empty(len(gammas)), np.empty(len(gammas))
    for i, g in enumerate(gammas):
        pred = np.where(gap >= g, best_s, best_u)
        S[i] = per_class_accuracy(pred[on_seen], labels[on_seen])
        U[i] = per_class_accuracy(pred[~on_seen], labels[~on_seen])
    return gammas, S, U


def ausuc(S: np.ndarray, U: np.ndarray) -> float:
    """Area under the seen–unseen accuracy curve (U as a function of S, trapezoids).

    Along increasing gamma S never rises and U never falls, so points are ordered by S descending,
    then U ascending (ties at equal S are vertical steps of the curve).
    """
    S, U = np.asarray(S, dtype=float), np.asarray(U, dtype=float)
    order = np.lexsort((U, -S))
    s, u = S[order], U[order]
    return float(np.sum((s[:-1] - s[1:]) * (u[:-1] + u[1:]) / 2))


def choose_gamma(scores: np.ndarray, labels: np.ndarray, seen: np.ndarray) -> float:
    """The calibration that maximises H on (validation) scores; 0 when no calibration beats it.

    The returned gamma lies midway between the two breakpoints that bound the best interval, so
    it transfers to new scores with a margin on both sides.
    """
    base = gzsl(scores, labels, seen, 0.0).H
    gammas, S, U = seen_unseen_curve(scores, labels, seen)
    H = np.array([harmonic_mean(s, u) for s, u in zip(S, U, strict=True)])
    i = int(np.argmax(H))
    if H[i] <= base:
        return 0.0
    finite = gammas[1:-1]
    if finite.size == 0:
        return 0.0
    if i == 0:
        return float(finite[0] - 1.0)
    if i == len(gammas) - 1:
        return float(finite[-1] + 1.0)
    hi = gammas[i + 1] if i + 1 < len(gammas) - 1 else gammas[i] + 1.0
    return float((gammas[i] + hi) / 2)


# --- retrieval metrics (a leaf: the trainers' validation uses them too) ---

KS = (1, 5, 10)


def _topk(sim: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices of the ``k`` largest entries per row (ties: lower index first), in row chunks."""
    k = min(k, sim.shape[1])
    return torch.cat([sim[i : i + chunk].topk(k, dim=1, sorted=True).indices for i in range(0, len(sim), chunk)])


def text_image_recall(img: torch.Tensor, txt: torch.Tensor, txt_to_img: Sequence[int],
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """``t2i_r@K``, ``i2t_r@K`` and ``mean_recall`` for L2-normalised image and text embeddings."""
    owner = torch.as_tensor(np.asarray(txt_to_img), dtype=torch.long)
    sim = txt.float() @ img.float().T  # texts × images
    top = _topk(sim, max(ks))
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_r@{k}"] = float((top[:, :k] == owner[:, None]).any(1).float().mean())
    top_t = _topk(sim.T, max(ks))  # images × texts
    hit_owner = owner[top_t]  # the image each retrieved text belongs to
    for k in ks:
        mine = hit_owner[:, :k] == torch.arange(len(img))[:, None]
        out[f"i2t_r@{k}"] = float(mine.any(1).float().mean())
    out["mean_recall"] = float(np.mean([out[f"{d}_r@{k}"] for d in ("t2i", "i2t") for k in ks]))
    return out


def image_image_metrics(emb: torch.Tensor, labels: Sequence[int], ks: Sequence[int] = KS, map_k: int = 10,
                        queries: Sequence[int] | None = None) -> dict[str, float]:
    """Leave-one-out image→image retrieval over ``emb`` (each query excluded from its own results).

    Returns ``i2i_r@K``, ``i2i_map@{map_k}`` and ``i2i_p@10``. Queries without any other image
    of their label are left out of the averages (their count is ``i2i_queries_without_match``).
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    q = torch.arange(len(emb)) if queries is None else torch.as_tensor(np.asarray(queries), dtype=torch.long)
    n_rel = torch.bincount(labels_t)[labels_t[q]] - 1
    keep = n_rel > 0
    q, n_rel = q[keep], n_rel[keep]
    if len(q) == 0:
        raise ClipkdError("image→image retrieval needs at least two images of some label")
    depth = max(max(ks), map_k, 10)
    rel_rows = []
    for i in range(0, len(q), 1024):
        qi = q[i : i + 1024]
        sim = emb[qi].float() @ emb.float().T
        sim[torch.arange(len(qi)), qi] = float("-inf")
        top = sim.topk(min(depth, len(emb) - 1), dim=1).indices
        rel_rows.append(labels_t[top] == labels_t[qi][:, None])
    rel = torch.cat(rel_rows).float()
    out = {f"i2i_r@{k}": float(rel[:, :k].amax(1).mean()) for k in ks}
    rk = rel[:, :map_k]
    precision_at = rk.cumsum(1) / torch.arange(1, rk.shape[1] + 1)
    ap = (precision_at * rk).sum(1) / torch.clamp(n_rel, max=map_k).float()
    out[f"i2i_map@{map_k}"] = float(ap.mean())
    out["i2i_p@10"] = float(rel[:, :10].sum(1).div(10).mean())
    out["i2i_queries"] = int(len(q))
    out["i2i_queries_without_match"] = int((~keep).sum())
    return out
