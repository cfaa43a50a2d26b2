"""``distill``'s resolve stage, before any image or model loads: the recipe checked against its inputs' names
and every ``auto`` field settled (a :class:`DistillPlan`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.views import ViewPlan, count_views, resolve_view_hue
from ..errors import ClipkdError
from ..students.losses import EMBEDDING_LOSSES, check_terms, term_needs
from ..students.model import check_student_arch
from .recipe import AUTO_VIEWS, MIX_MODES, MIXES, TrainConfig, check_logger, check_train_config

log = logging.getLogger(__name__)


def store_views(store: str | Path | None) -> ViewPlan | None:
    """The view plan of a store of views (``embed-images --views``), or None for a store of plain images."""
    if store is None or not (Path(store) / "views.json").is_file():
        return None
    return ViewPlan.load(Path(store) / "views.json")


def _follow_store_views(cfg: TrainConfig, plan: ViewPlan, store: str | Path, teacher: str | None,
                        extra_images: str | Path | None) -> TrainConfig:
    """A run from a store of views takes its views, mix and hue from the store's plan: ``auto`` settings follow it,
    a setting that contradicts it is refused (the targets were embedded for the plan's views, not others)."""
    if teacher is not None:
        raise ClipkdError(f"store {store} holds the teacher's embedding of every view; drop `teacher`")
    if extra_images is not None:
        raise ClipkdError(f"store {store} is a store of views; embed the pool's images into it (embed-images --views "
                          "over the training images and the pool) instead of `extra_images`")
    for name, mine, theirs in (("views", cfg.views, plan.views), ("view_hue", cfg.view_hue, plan.hue_prob),
                               ("mix", cfg.mix, plan.mix)):
        if mine != "auto" and mine != theirs:
            raise ClipkdError(f"store {store} holds {theirs!r} for {name} (embed-images --views); got {mine!r}: drop "
                              "it or embed another store")
    return replace(cfg, views=plan.views, view_hue=plan.hue_prob, mix=plan.mix, mix_alpha=plan.alpha,
                   mix_prob=plan.prob)


@dataclass
class DistillPlan:
    """A checked ``distill`` plan: the config with every ``auto`` field settled, its distillation terms and what
    they need (``target``, ``text``, ``vocab``), and the view plan when the store is a store of views."""

    cfg: TrainConfig
    terms: dict[str, float]
    needs: set[str]
    stored: ViewPlan | None = None


def _check_mix_fields(cfg: TrainConfig) -> None:
    """One-line errors for the mixing fields' values (``mix_alpha``, ``mix_mode``, ``mix_prob``)."""
    if cfg.mix_alpha <= 0:
        raise ClipkdError(f"`mix_alpha` must be > 0, got {cfg.mix_alpha}")
    if cfg.mix_mode not in MIX_MODES:
        raise ClipkdError(f"`mix_mode` must be batch or elem, got '{cfg.mix_mode}'")
    if not 0.0 <= cfg.mix_prob <= 1.0:
        raise ClipkdError(f"`mix_prob` must be in [0, 1], got {cfg.mix_prob}")


def resolve_distill(cfg: TrainConfig, store: str | Path | None = None, teacher: str | None = None,
                    extra_images: str | Path | None = None, extra_store: str | Path | None = None) -> DistillPlan:
    """The first stage of :func:`distill`, before any image or model loads: check the recipe against its inputs
    and settle every ``auto`` field (errors name the fields). Unit-testable without images."""
    EMBEDDING_LOSSES.entry(cfg.loss)
    terms = check_terms(cfg.terms)
    needs = term_needs(terms)
    check_logger(cfg.logger)
    if store is None and teacher is None:
        raise ClipkdError("give a target source: `store`=STORE (precomputed), `teacher`=SPEC (online), or both "
                          "(the store for plain images, the teacher only for mixed ones)")
    if cfg.mix not in MIXES:
        raise ClipkdError(f"unknown mix '{cfg.mix}' (auto, none, mixup, cutmix)")
    stored = store_views(store)  # a store of views (embed-images --views): clipkd's method from the store
    if stored is not None:
        cfg = _follow_store_views(cfg, stored, store, teacher, extra_images)
    if cfg.mix == "auto":
        cfg = replace(cfg, mix="cutmix" if teacher is not None and "text" not in term_needs(cfg.terms) else "none")
        if cfg.mix == "none" and teacher is None:
            log.debug("distilling from a store: no mixing (CutMix function matching, clipkd's GZSL method, needs "
                     "`teacher` to embed each mixed image)")
    _check_mix_fields(cfg)
    if cfg.views == "auto":  # an online teacher alone (a pool too: its images get views in the same pass)
        online_mix = (teacher is not None and store is None and extra_store is None and cfg.mix != "none"
                      and cfg.mix_mode == "elem")
        cfg = replace(cfg, views=AUTO_VIEWS if online_mix else 0)
    cfg = replace(cfg, views=count_views(cfg.views))  # 0 and 1: no stored views (a mix, if any, online)
    cfg = replace(cfg, view_hue=resolve_view_hue(cfg.view_hue, bool(cfg.views), "`views`=K (K ≥ 2), stored views"))
    if cfg.views and teacher is None and stored is None:
        raise ClipkdError("`views` needs `teacher`=SPEC (it embeds each view once, before training), or a store of "
                          "views (embed-images --views K)")
    if cfg.views and stored is None and (store is not None or extra_store is not None):
        raise ClipkdError("`views` builds its own store of views (OUT/views) over the training images and the "
                          "pool, in one teacher pass; drop `store` and `extra_store`")
    if cfg.views and cfg.mix_mode != "elem":
        raise ClipkdError("`views` draws a box per view (`mix_mode`=elem); `mix_mode`=batch mixes online (`views`=0)")
    if cfg.views and cfg.augment not in ("none", "flip"):
        raise ClipkdError(f"`views` draws flips itself (`augment` flip or none), not '{cfg.augment}'")
    if cfg.mix != "none" and teacher is None and stored is None:
        raise ClipkdError("`mix` needs the teacher's embedding of each mixed image: use `teacher`=SPEC (online)")
    if store is not None and teacher is not None and cfg.mix == "none":
        raise ClipkdError("`store` with `teacher` means: the teacher embeds only the mixed images; with `mix`=none "
                          "give only one of them")
    if cfg.mix != "none" and "text" in needs and not cfg.views:
        raise ClipkdError("`mix`=online trains on teacher targets of mixed images; drop the label term (use vocab), "
                          "or use `views` (the label term then trains on the views neither mixed nor recoloured)")
    if extra_images is not None and store is not None and extra_store is None:
        raise ClipkdError("`extra_images` with `store` needs `extra_store` (the pool's embed-images store)")
    check_train_config(cfg)
    check_student_arch(cfg.student)
    if teacher is not None:
        from ..teachers.factory import check_teacher_spec

        check_teacher_spec(teacher)
    return DistillPlan(cfg, terms, needs, stored)


def resolve_supervised(cfg: TrainConfig) -> TrainConfig:
    """``train-supervised``'s resolve stage: the recipe's shared fields and the student's architecture, before any
    image loads."""
    check_logger(cfg.logger)
    check_train_config(cfg)
    check_student_arch(cfg.student)
    return cfg
