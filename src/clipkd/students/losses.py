"""Distillation losses, each registered by name.

Three registries, each filled by decorated functions in this file (adding one touches nothing else):

- :data:`EMBEDDING_LOSSES` — distances between a student embedding and its teacher target (``mse``...).
- :data:`DISTILL_TERMS` — the weighted terms a ``distill`` recipe sums (``embed``, ``label``...); each
  declares what it needs (teacher targets, seen-class text embeddings).
- :data:`KD_LOSSES` — CLIP-to-CLIP distillation losses of ``clip-train``; ``meta["space"] == "teacher"``
  marks the ones that compare image embeddings in the teacher's space (so a projection is needed when sizes
  differ), ``meta["needs_text"]`` the ones that need both models' text embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipkdError
from ..registry import Registry

EMBEDDING_LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("embedding loss")
DISTILL_TERMS: Registry[Callable[[TermInputs], torch.Tensor]] = Registry("distillation term")
KD_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("distillation loss")


# --- embedding distances (inputs already L2-normalised; summed over dimensions, averaged over the batch) ---

@EMBEDDING_LOSSES.register("mse", help="squared distance of unit embeddings, summed over dimensions")
def _mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s, t, reduction="none").sum(-1).mean()


@EMBEDDING_LOSSES.register("l1", help="L1 distance of unit embeddings, summed over dimensions")
def _l1(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(s, t, reduction="none").sum(-1).mean()


@EMBEDDING_LOSSES.register("huber", help="smooth L1 (beta 0.1) of unit embeddings, summed over dimensions")
def _huber(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(s, t, reduction="none", beta=0.1).sum(-1).mean()


@EMBEDDING_LOSSES.register("cosine", help="1 - cosine similarity")
def _cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - (s * t).sum(-1)).mean()


def embedding_loss(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance ``name`` between the L2-normalised student embedding and the (unit) teacher embedding.

    ``mse``/``l1``/``huber`` are summed over the embedding dimension and averaged over the batch
    (so their scale does not shrink with the embedding size); ``cosine`` is ``1 - cos``.
    """
    fn = EMBEDDING_LOSSES.get(name)
    if student.shape != teacher.shape:
        raise ClipkdError(f"student embedding {tuple(student.shape)} vs teacher {tuple(teacher.shape)}: "
                          "sizes differ")
    return fn(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1))


def label_loss(student: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Cross entropy over ``logit_scale * cos(student, text_c)`` for the given classes' text embeddings.

    Labels of -100 (unlabelled images, e.g. an auxiliary pool) are ignored; a batch without a label gives 0.
    """
    logits = logit_scale * F.normalize(student.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)


def vocab_kl(student: torch.Tensor, teacher: torch.Tensor, vocab: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmax over ``scale · cos(·, vocab_v)``: where each image sits relative to
    every word of the vocabulary, as the teacher sees it. Averaged over the batch; zero when they agree."""
    v = F.normalize(vocab.float(), dim=-1)
    s_logits = scale * F.normalize(student.float(), dim=-1) @ v.T
    t_logits = scale * F.normalize(teacher.float(), dim=-1) @ v.T
    return F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), reduction="batchmean", log_target=True)


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the batch's pairwise cosine similarities (RKD's angle-free relation):
    the student keeps how its images relate to each other as the teacher does, whatever the absolute place."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    n = len(s)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    return F.mse_loss((s @ s.T)[off], (t @ t.T)[off]) if n > 1 else s.sum() * 0.0


# --- the terms a `distill` recipe combines with weights ---

@dataclass
class TermInputs:
    """What a distillation term may look at for one batch.

    ``student``: raw student outputs (B, D); ``target``: the teacher's unit image embeddings (B, D);
    ``labels``: positions among the seen classes (-100 = none); ``text``: the seen classes' text
    embeddings (C, D); ``logit_scale``: the teacher's temperature; ``distance``: the embedding loss name;
    ``vocab``: text embeddings of a vocabulary (every class name, seen and unseen, optionally widened with
    generic words) and ``vocab_scale`` its temperature.
    """

    student: torch.Tensor
    target: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    logit_scale: float = 100.0
    distance: str = "mse"
    vocab: torch.Tensor | None = None
    vocab_scale: float = 100.0


@DISTILL_TERMS.register("embed", help="embedding distance to the teacher's image embedding (the seed's method)",
                        needs=("target",))
def embed_term(x: TermInputs) -> torch.Tensor:
    return embedding_loss(x.distance, x.student, x.target)


@DISTILL_TERMS.register("label", help="cross entropy over the seen classes' text embeddings (the seed's label term)",
                        needs=("text",))
def label_term(x: TermInputs) -> torch.Tensor:
    return label_loss(x.student, x.text, x.labels, x.logit_scale)


@DISTILL_TERMS.register("vocab", help="KL to the teacher's softmax over a vocabulary: every class name, seen and "
                        "unseen, plus optional generic words (vocabulary-anchored distillation)",
                        needs=("target", "vocab"))
def vocab_term(x: TermInputs) -> torch.Tensor:
    return vocab_kl(x.student, x.target, x.vocab, x.vocab_scale)


@DISTILL_TERMS.register("relation", help="the batch's pairwise similarities, as the teacher's (relational KD)",
                        needs=("target",))
def relation_term(x: TermInputs) -> torch.Tensor:
    return relational_loss(x.student, x.target)


def check_terms(weights: dict[str, float]) -> dict[str, float]:
    """The terms with a positive weight; unknown names or negative weights are one-line errors."""
    for name, w in weights.items():
        DISTILL_TERMS.entry(name)
        if w < 0:
            raise ClipkdError(f"weight of distillation term '{name}' must be >= 0, got {w}")
    active = {n: float(w) for n, w in weights.items() if w > 0}
    if not active:
        raise ClipkdError("every distillation term has weight 0: nothing to train")
    return active


def term_needs(weights: dict[str, float]) -> set[str]:
    """What the active terms need between them (``target``, ``text``)."""
    return {need for n in check_terms(weights) for need in DISTILL_TERMS.entry(n).meta.get("needs", ())}


# --- CLIP-to-CLIP distillation (clip-train) ---

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


@KD_LOSSES.register("cosine", help="1 - cos of image embeddings (Chinese-CLIP's distillation)", space="teacher")
def _kd_cosine(s_img, t_img, s_txt=None, t_txt=None, s_scale=100.0, t_scale=100.0) -> torch.Tensor:
    return embedding_loss("cosine", s_img, t_img)


@KD_LOSSES.register("mse", help="squared distance of unit image embeddings (CLIP-KD feature distillation)",
                    space="teacher")
def _kd_mse(s_img, t_img, s_txt=None, t_txt=None, s_scale=100.0, t_scale=100.0) -> torch.Tensor:
    return embedding_loss("mse", s_img, t_img)


@KD_LOSSES.register("relation", help="the batch's image-image similarities, as the teacher's (relational KD; "
                    "each model in its own space)")
def _kd_relation(s_img, t_img, s_txt=None, t_txt=None, s_scale=100.0, t_scale=100.0) -> torch.Tensor:
    return relational_loss(s_img, t_img)


@KD_LOSSES.register("affinity", help="KL of image-text similarity distributions (TinyCLIP / DistillClipLoss)",
                    needs_text=True)
def _kd_affinity(s_img, t_img, s_txt=None, t_txt=None, s_scale=100.0, t_scale=100.0) -> torch.Tensor:
    if s_txt is None or t_txt is None:
        raise ClipkdError("the affinity loss needs student and teacher text embeddings")
    return affinity_loss(s_img, s_txt, t_img, t_txt.detach(), s_scale, t_scale)


def kd_loss(name: str, s_img: torch.Tensor, t_img: torch.Tensor, s_txt: torch.Tensor | None = None,
            t_txt: torch.Tensor | None = None, s_scale: torch.Tensor | float = 100.0,
            t_scale: float = 100.0) -> torch.Tensor:
    """The registered CLIP-to-CLIP distillation loss ``name``; ``s_img`` must already be in the teacher's
    space for the losses whose ``meta["space"]`` is ``"teacher"``. Teacher inputs are detached."""
    return KD_LOSSES.get(name)(s_img, t_img.detach(), s_txt, t_txt, s_scale, t_scale)


def kd_needs_projection(name: str) -> bool:
    """Whether loss ``name`` compares image embeddings in the teacher's space (a projection when sizes differ)."""
    return KD_LOSSES.entry(name).meta.get("space") == "teacher"


def kd_needs_text(name: str) -> bool:
    """Whether loss ``name`` needs both models' text embeddings."""
    return bool(KD_LOSSES.entry(name).meta.get("needs_text"))
