"""``clipkd distill`` and ``clipkd train-supervised``: students trained on the seen classes only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from ..data.datasets import load_labelled
from ..data.loader import ImageDataset, make_loader
from ..data.splits import load_split
from ..errors import ClipkdError
from ..fileio import write_json
from ..prompts import TextEmbeddings
from ..store import EmbeddingStore
from ..students.losses import EMBEDDING_LOSSES
from ..students.model import CLIP_MEAN, CLIP_STD, StudentConfig, augment_ops, save_student, student_transform
from .modules import StudentModule
from .recipe import Recipe
from .trainer import fit


@dataclass
class TrainConfig(Recipe):
    """A training recipe as data (JSON-able; ``--config FILE`` loads one, flags override it)."""

    student: str = "resnet18"
    loss: str = "mse"
    embed_weight: float = 1.0
    label_weight: float = 0.0
    logit_scale: float = 0.0  # 0: the teacher's own (from the text-embedding file)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    image_size: int = 0  # 0: the teacher's input size
    augment: str = "flip"
    pretrained: bool = False
    workers: int | None = None
    seed: int = 0


def _seen_images(images: str | Path, split_path: str | Path | None):
    data = load_labelled(images)
    if split_path is None:
        return data, list(data.classnames)
    split = load_split(split_path)
    missing = [c for c in split.seen if c not in data.classnames]
    if missing:
        raise ClipkdError(f"split file {split_path} names {len(missing)} seen class(es) with no folder in "
                          f"{images}: {missing[:5]}")
    seen = list(split.seen)
    return data.subset(set(seen)), seen


def _label_map(classnames: list[str], trained: list[str]) -> torch.Tensor:
    pos = {c: i for i, c in enumerate(trained)}
    return torch.tensor([pos.get(c, -100) for c in classnames], dtype=torch.long)


def _write_run(out: Path, module: StudentModule, cfg: TrainConfig, info: dict[str, Any]) -> Path:
    path = save_student(out / "student.pt", module.student.cpu(), extra={"train": asdict(cfg), **info})
    write_json(out / "run.json", {"train": asdict(cfg), "student": asdict(module.student.cfg), **info})
    return path


def distill(
    images: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    store: str | Path | None = None,
    teacher: str | None = None,
    text: str | Path | None = None,
    split: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> Path:
    """Train an embedding student on the seen classes of ``images``; return its ``student.pt``.

    Targets come from ``store`` (computed once by ``embed-images``) or from ``teacher`` run online
    on the same augmented view the student sees. ``text`` (the teacher's class text embeddings)
    is needed when ``cfg.label_weight > 0`` and supplies the default logit scale.
    """
    out = Path(out)
    if cfg.loss not in EMBEDDING_LOSSES:
        raise ClipkdError(f"unknown loss '{cfg.loss}' (choose from {', '.join(EMBEDDING_LOSSES)})")
    if (store is None) == (teacher is None):
        raise ClipkdError("give exactly one target source: --store STORE (precomputed) or --teacher SPEC (online)")
    data, seen = _seen_images(images, split)
    torch.manual_seed(cfg.seed)

    text_emb = TextEmbeddings.load(text) if text else None
    if cfg.label_weight > 0 and text_emb is None:
        raise ClipkdError("--label-weight > 0 needs --text (the teacher's class text embeddings)")

    targets = online = None
    if store is not None:
        st = EmbeddingStore(store)
        identity, dim, pre = st.teacher, st.embed_dim, st.manifest["preprocess"]
        rows = st.rows(data.paths)
        missing = int((rows < 0).sum())
        if missing == len(rows):
            raise ClipkdError(f"store {store} has no embedding for any image of {images} "
                              "(was it built from another folder?)")
        if missing:
            print(f"note: {missing} of {len(rows)} training images have no embedding in {store}; left out")
            keep = np.flatnonzero(rows >= 0)
            data = type(data)(data.root, [data.paths[i] for i in keep], [data.labels[i] for i in keep],
                              data.classnames)
            rows = rows[keep]
        targets = torch.from_numpy(np.asarray(st.embeddings()[rows], dtype=np.float16))
    else:
        from ..teachers import load_teacher

        online = load_teacher(teacher, device=device, precision=precision)
        identity, dim, pre = online.identity, online.embed_dim, online.preprocess_cfg
    if text_emb is not None and text_emb.teacher != identity:
        raise ClipkdError(f"text embeddings {text} come from teacher '{text_emb.teacher}', but the image "
                          f"targets from '{identity}'")
    if text_emb is not None and text_emb.embeddings.shape[1] != dim:
        raise ClipkdError(f"text embeddings have size {text_emb.embeddings.shape[1]}, image targets {dim}")

    size = cfg.image_size or int(max(pre.get("size") or [224]))
    scfg = StudentConfig(arch=cfg.student, out_dim=dim, kind="embedding", image_size=size,
                         mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
                         teacher=identity, pretrained=cfg.pretrained)
    if online is not None:
        augment = T.Compose(augment_ops(size, cfg.augment))
        plain = student_transform(scfg, "none")

        def transform(img):
            view = augment(img)
            return plain(view), online.preprocess(view)
    else:
        transform = student_transform(scfg, cfg.augment)
    text_seen = torch.from_numpy(text_emb.select(seen).embeddings) if text_emb is not None else None
    scale = cfg.logit_scale or (text_emb.logit_scale if text_emb is not None else 100.0)
    module = StudentModule(scfg, _label_map(data.classnames, seen), loss=cfg.loss,
                           embed_weight=cfg.embed_weight, label_weight=cfg.label_weight, text=text_seen,
                           logit_scale=scale, targets=targets, teacher=online, lr=cfg.lr,
                           weight_decay=cfg.weight_decay, warmup=cfg.warmup)
    dataset = ImageDataset(data.root, data.paths, transform, labels=data.labels)
    # Rows of `targets` follow `data.paths`, so the dataset index is the target row.
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, workers=cfg.workers, drop_last=True,
                         seed=cfg.seed)
    if len(loader) == 0:
        raise ClipkdError(f"{len(dataset)} training images is fewer than one batch of {cfg.batch_size}")
    fit(module, loader, out, cfg.epochs, device=device, precision=precision, progress=progress)
    return _write_run(out, module, cfg, {"seen_classes": seen, "train_images": len(dataset),
                                         "targets": "store" if store else "online"})


def train_supervised(
    images: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    split: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> Path:
    """The normal-training baseline: the same backbone with a classification head on the seen classes."""
    out = Path(out)
    data, seen = _seen_images(images, split)
    torch.manual_seed(cfg.seed)
    scfg = StudentConfig(arch=cfg.student, out_dim=len(seen), kind="classifier",
                         image_size=cfg.image_size or 224, classnames=seen, pretrained=cfg.pretrained)
    module = StudentModule(scfg, _label_map(data.classnames, seen), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           warmup=cfg.warmup)
    dataset = ImageDataset(data.root, data.paths, student_transform(scfg, cfg.augment), labels=data.labels)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, workers=cfg.workers, drop_last=True,
                         seed=cfg.seed)
    if len(loader) == 0:
        raise ClipkdError(f"{len(dataset)} training images is fewer than one batch of {cfg.batch_size}")
    fit(module, loader, out, cfg.epochs, device=device, precision=precision, progress=progress)
    return _write_run(out, module, cfg, {"seen_classes": seen, "train_images": len(dataset)})
