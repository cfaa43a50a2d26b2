"""Distillation losses: embedding regression against the teacher, and the label term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ClipkdError

EMBEDDING_LOSSES = ("mse", "l1", "huber", "cosine")


def embedding_loss(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance between the L2-normalised student embedding and the (unit) teacher embedding.

    ``mse``/``l1``/``huber`` are summed over the embedding dimension and averaged over the batch
    (so their scale does not shrink with the embedding size); ``cosine`` is ``1 - cos``.
    """
    if student.shape != teacher.shape:
        raise ClipkdError(f"student embedding {tuple(student.shape)} vs teacher {tuple(teacher.shape)}: "
                          "sizes differ")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    if name == "mse":
        return F.mse_loss(s, t, reduction="none").sum(-1).mean()
    if name == "l1":
        return F.l1_loss(s, t, reduction="none").sum(-1).mean()
    if name == "huber":
        return F.smooth_l1_loss(s, t, reduction="none", beta=0.1).sum(-1).mean()
    if name == "cosine":
        return (1 - (s * t).sum(-1)).mean()
    raise ClipkdError(f"unknown embedding loss '{name}' (choose from {', '.join(EMBEDDING_LOSSES)})")


def label_loss(student: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Cross entropy over ``logit_scale * cos(student, text_c)`` for the given classes' text embeddings."""
    logits = logit_scale * F.normalize(student.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    return F.cross_entropy(logits, labels)
