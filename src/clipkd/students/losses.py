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


KD_LOSSES = ("cosine", "mse", "affinity")


def affinity_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
                  s_scale: torch.Tensor | float, t_scale: float) -> torch.Tensor:
    """KL(teacher ‖ student) between image→text and text→image similarity distributions of a batch.

    Each model uses its own embeddings and temperature, so sizes may differ. Zero when the student's
    distributions equal the teacher's; averaged over the two directions (as open_clip's ``DistillClipLoss``,
    which uses cross entropy instead — same gradient, but not zero at the optimum).
    """
    s_img, s_txt = F.normalize(s_img.float(), dim=-1), F.normalize(s_txt.float(), dim=-1)
    t_img, t_txt = F.normalize(t_img.float(), dim=-1), F.normalize(t_txt.float(), dim=-1)
    s_logits = s_scale * s_img @ s_txt.T
    t_logits = t_scale * t_img @ t_txt.T

    def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)

    return (kl(t_logits, s_logits) + kl(t_logits.T, s_logits.T)) / 2


def kd_loss(name: str, s_img: torch.Tensor, t_img: torch.Tensor, s_txt: torch.Tensor | None = None,
            t_txt: torch.Tensor | None = None, s_scale: torch.Tensor | float = 100.0,
            t_scale: float = 100.0) -> torch.Tensor:
    """A CLIP-to-CLIP distillation loss; ``s_img`` must already be in the teacher's space for cosine/mse.

    ``cosine``: ``1 - cos`` of image embeddings (Chinese-CLIP's distillation); ``mse``: squared
    distance of L2-normalised image embeddings, summed over dimensions (CLIP-KD's feature
    distillation); ``affinity``: :func:`affinity_loss` (TinyCLIP / open_clip ``DistillClipLoss``).
    Teacher inputs are detached: no gradient ever reaches the teacher.
    """
    t_img = t_img.detach()
    if name in ("cosine", "mse"):
        return embedding_loss(name, s_img, t_img)
    if name == "affinity":
        if s_txt is None or t_txt is None:
            raise ClipkdError("the affinity loss needs student and teacher text embeddings")
        return affinity_loss(s_img, s_txt, t_img, t_txt.detach(), s_scale, t_scale)
    raise ClipkdError(f"unknown distillation loss '{name}' (choose from {', '.join(KD_LOSSES)})")
