"""Recipes are data: dataclasses of training settings, readable from JSON, overridable by flags, and the one-line
checks of their shared fields (the resolve stage every training job starts with)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..distributed import ranks
from ..errors import ClipkdError
from ..fileio import read_json

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
LOGGERS = ("csv", "tensorboard", "wandb")
MIXES = ("auto", "none", "mixup", "cutmix")  # `mix`: how training images are mixed
MIX_MODES = ("elem", "batch")  # `mix_mode`: a box and ratio per image, or one per batch
AUGMENTS = ("none", "flip", "crop")  # `augment`: the student's online augmentation
AUTO_VIEWS = 4  # views per image of clipkd's GZSL method by default (the image + 3 flipped CutMix composites)


def recipe_path(name: str) -> Path:
    """The JSON file of a recipe shipped with clipkd (``clipkd/recipes/NAME.json``)."""
    path = RECIPES / f"{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES.glob("*.json"))
        raise ClipkdError(f"clipkd ships no recipe '{name}' (shipped: {', '.join(shipped)})")
    return path


class Recipe:
    """Mixin for recipe dataclasses: ``from_file`` reads a JSON recipe and applies overrides."""

    @classmethod
    def from_file(cls, path: str | Path | None, **overrides: Any):
        """Read a recipe JSON; unknown keys are an error naming them; ``None`` overrides are ignored."""
        data = read_json(path, "recipe") if path else {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ClipkdError(f"recipe {path}: unknown key(s) {unknown}; known: {sorted(names)}")
        data.update({k: v for k, v in overrides.items() if v is not None and k in names})
        return cls(**data)

    @classmethod
    def shipped(cls, name: str, **overrides: Any):
        """A recipe shipped with clipkd (see :func:`recipe_path`), with ``overrides`` applied."""
        return cls.from_file(recipe_path(name), **overrides)


@dataclass
class TrainerSettings(Recipe):
    """Where and how a run trains (Lightning's trainer configuration), shared by every training recipe.

    ``devices``: how many devices per machine (or ``"auto"``); ``num_nodes``/``strategy``: as Lightning takes them
    (``auto`` = one device, ``ddp`` for several); ``precision``: ``auto`` (fp16 mixed on GPU, fp32 on
    CPU), ``fp32``, ``fp16``, ``bf16``; ``logger``: ``csv`` (always written; the training-curve PNG reads it),
    ``tensorboard`` or ``wandb`` in addition.
    """

    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    logger: str = "csv"


def seed_all(seed: int) -> None:
    """Seed torch's and Python's generators: a run with ``workers=0`` draws its captions (``random.choice``) in this
    process, where Python's generator would otherwise be seeded from the clock (DataLoader workers seed their own)."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def check_logger(name: str) -> None:
    """Refuse an unknown logger, or one whose package is not installed, before any work starts."""
    if name not in LOGGERS:
        raise ClipkdError(f"unknown logger '{name}' (choose from {', '.join(LOGGERS)})")
    if name == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ClipkdError("`logger`=tensorboard needs TensorBoard: pip install tensorboard (or tensorboardX)")
    if name == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ClipkdError("`logger`=wandb needs Weights & Biases: pip install wandb")


def check_ranks(settings: Any) -> None:
    """A job launched as N ranks (``torchrun``, ``srun``) must ask for N devices in all (``--devices`` ×
    ``--num-nodes``): Lightning would otherwise train each rank alone or wait for ranks that never come."""
    devices = getattr(settings, "devices", 1)
    nodes = getattr(settings, "num_nodes", 1) or 1
    r = ranks()
    if r.distributed and isinstance(devices, int) and devices * nodes != r.world:
        raise ClipkdError(f"this job runs {r.world} ranks but asks for {devices} device(s) × {nodes} node(s); "
                          f"pass `devices`=D `num_nodes`=M with D × M = {r.world}")


def check_train_config(cfg: Any) -> None:
    """One place for the settings every training recipe shares: one-line errors before any work starts."""
    from ..errors import check_fields

    check_fields(cfg)
    for name, low in (("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("num_nodes", 1)):
        value = getattr(cfg, name, None)
        if value is not None and (not isinstance(value, int) or value < low):
            raise ClipkdError(f"`{name}` must be an integer ≥ {low}, got {value!r}")
    workers = getattr(cfg, "workers", None)
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ClipkdError(f"`workers` must be an integer ≥ 0, got {workers!r}")
    for name in ("lr",):
        value = getattr(cfg, name, None)
        if value is not None and not value > 0:
            raise ClipkdError(f"`{name}` must be > 0, got {value!r}")
    if getattr(cfg, "weight_decay", 0) < 0:
        raise ClipkdError(f"`weight_decay` must be ≥ 0, got {cfg.weight_decay!r}")
    check_logger(getattr(cfg, "logger", "csv"))
    check_ranks(cfg)


@dataclass
class TrainConfig(TrainerSettings):
    """A student-training recipe as data (JSON-able; ``--config FILE`` loads one, flags override it).

    ``terms``: the weighted distillation terms summed into the loss (names from
    :data:`~clipkd.students.losses.DISTILL_TERMS`: ``embed`` = the seed's embedding loss, ``label`` = its
    label term, ``vocab`` = vocabulary-anchored distillation, ``relation`` = the batch's similarity
    structure); ``loss``: the embedding distance the ``embed`` term uses; ``mix``: mixup / cutmix of the
    training images, with the (online) teacher's embedding of each mixed image as its target — clipkd's GZSL
    method ("CutMix function matching": every image its own CutMix box and ratio, ``mix_mode="elem"``), on by
    default (``auto``) whenever the teacher runs online; ``views``: that many views per image drawn once and
    embedded once by the teacher (a multi-view store), ``view_hue`` of the views after the first recoloured.
    """

    student: str = "resnet18"
    loss: str = "mse"
    terms: dict[str, float] = field(default_factory=lambda: {"embed": 1.0})
    logit_scale: float = 0.0  # 0: the teacher's own (from the text-embedding file)
    vocab_scale: float = 0.0  # temperature of the vocab term; 0: the teacher's logit scale
    mix: str = "auto"  # auto (cutmix with an online teacher, none with a store) | none | mixup | cutmix
    mix_alpha: float = 1.0
    mix_prob: float = 1.0  # fraction of batches (mix_mode batch) or of images (elem) mixed; the rest stay plain
    mix_mode: str = "elem"  # elem: a ratio and box per image (clipkd's method); batch: one per batch (timm's default)
    views: int | str = "auto"  # K ≥ 2: K views per image (the image + K-1 flipped/mixed), each embedded once by the
    # teacher, then trained on; 0 or 1 (data.views.count_views): no views, a mix (if any) online every epoch; auto: 4
    # when the teacher alone gives mixed targets
    view_hue: float | str = "auto"  # share of views (after the first) whose hues are rotated at random; auto:
    # data.views.AUTO_HUE with views, 0 without
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    image_size: int = 0  # 0: the teacher's input size
    augment: str = "flip"
    pretrained: bool | str = False  # True: timm's hub weights; a path: a local weights file
    init: str = ""  # a trained clipkd student (run folder or student.pt) to start from: fine-tuning, e.g. to 2:4
    sparsity: str = ""  # "2:4": prune to NVIDIA's 2:4 pattern when training starts and keep it while training
    qat: bool = False  # quantization-aware fine-tuning of --init; the run's product is student.int8.onnx
    workers: int | None = None
    seed: int = 0


@dataclass
class TrainResult:
    """What a training run produced: the run folder, the model file, and what was left out."""

    out: Path
    path: Path  # student.pt, or the trained CLIP's weights file
    spec: str = ""  # for CLIPs: the spec that loads the result
    train_images: int = 0
    skipped_images: int = 0
    best: dict[str, Any] | None = None
