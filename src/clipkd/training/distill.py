"""``clipkd distill`` and ``clipkd train-supervised``: students trained on the seen classes only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fileio import ref
from .build import (
    Built,
    build_distill,
    build_supervised,
    load_labelled_or_plain,
    prepare_distill,
    ready_to_fit,
    view_set,
)
from .recipe import AUGMENTS, AUTO_VIEWS, MIX_MODES, MIXES, TrainConfig, TrainResult
from .resolve import DistillPlan, resolve_distill, resolve_supervised, store_views
from .runs import check_run, claim_run, run_recipe
from .save import save_run
from .trainer import fit, skipped_images

__all__ = ["AUGMENTS", "AUTO_VIEWS", "MIXES", "MIX_MODES", "DistillPlan", "TrainConfig", "TrainResult", "distill",
           "load_labelled_or_plain", "resolve_distill", "store_views", "train_supervised", "view_set"]


def _train(build: Callable[[], Built], out: Path, cfg: TrainConfig, device: str, progress: bool,
           recipe: dict[str, Any], overwrite: bool | str) -> TrainResult:
    """The stages every student run shares once it is resolved and planned: hold the run folder, ``build()`` the
    module and data set under its lock (work that writes into the folder happens there), the loader, the one
    training loop, the save."""
    with claim_run(out, recipe, overwrite):
        built = build()
        run = ready_to_fit(built, cfg)
        trainer = fit(built.module, run.loader, out, cfg.epochs, device=device, settings=cfg, progress=progress,
                      callbacks=run.callbacks)
        return save_run(out, cfg, built, run.items, skipped_images(trainer, run.loader))


def distill(
    images: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    store: str | Path | None = None,
    teacher: str | None = None,
    text: str | Path | None = None,
    split: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    vocab: str | Path | None = None,
    extra_images: str | Path | None = None,
    extra_store: str | Path | None = None,
    overwrite: bool | str = False,
) -> TrainResult:
    """Train an embedding student on the seen classes of ``images``.

    Targets come from ``store`` (computed once by ``embed-images``) or from ``teacher`` run online
    on the same augmented view the student sees. ``text`` (the teacher's class text embeddings, every
    class, seen and unseen) is needed by terms that use it (``label``, ``vocab``) and supplies the default
    logit scale. ``vocab``: more text embeddings (e.g. generic nouns, from ``embed-text``) that widen the
    ``vocab`` term's vocabulary. ``extra_images``: an unlabelled pool (folder or list) trained on with
    teacher targets only — from ``extra_store`` (its embed-images store), or online with ``teacher``.
    With both ``store`` and ``teacher`` (and mixing on), the store gives the targets of the images left plain and
    the teacher embeds only the mixed ones: ``mix_prob`` of the teacher cost of a fully online run.
    ``out`` resumes a killed run of the same recipe; a run of another recipe there is refused unless
    ``overwrite`` (see :mod:`clipkd.training.runs`).
    """
    out, store, extra_store = Path(out), ref(store), ref(extra_store)
    plan = resolve_distill(cfg, store=store, teacher=teacher, extra_images=extra_images, extra_store=extra_store)
    recipe = run_recipe("distill", plan.cfg, images=images, store=store, teacher=teacher, text=text, split=split,
                        vocab=vocab, extra_images=extra_images, extra_store=extra_store)
    check_run(out, recipe, overwrite)
    parts = prepare_distill(plan, images, store=store, teacher=teacher, text=text, split=split, vocab=vocab,
                            extra_images=extra_images, extra_store=extra_store, device=device)
    return _train(lambda: build_distill(parts, out, store, progress), out, plan.cfg, device, progress, recipe,
                  overwrite)


def train_supervised(
    images: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    split: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool | str = False,
) -> TrainResult:
    """The normal-training baseline: the same backbone with a classification head on the seen classes."""
    out, cfg = Path(out), resolve_supervised(cfg)
    recipe = run_recipe("train-supervised", cfg, images=images, split=split)
    check_run(out, recipe, overwrite)
    return _train(lambda: build_supervised(cfg, images, split), out, cfg, device, progress, recipe, overwrite)
