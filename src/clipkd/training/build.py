"""``distill``'s build stage: the images, text and target sources loaded and tied to one teacher
(:func:`prepare_distill`), then, under the run folder's lock, the data set and module (:func:`build_distill`) and
the loader (:func:`ready_to_fit`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ..data.datasets import seen_images
from ..data.folders import LabelledImages
from ..data.loader import ImageDataset, make_loader
from ..data.preprocess import PreprocessConfig
from ..data.views import ViewPlan, ViewSampler, make_view_plan
from ..distributed import barrier
from ..errors import ClipkdError
from ..prompts import TextEmbeddings
from ..store import EmbeddingStore, TargetRows, embed_views
from ..students.model import StudentConfig, augment_ops, student_transform
from .modules import StudentModule
from .recipe import TrainConfig, seed_all
from .resolve import DistillPlan

log = logging.getLogger(__name__)


@dataclass
class ViewSet:
    """The views a run trains on: their store keys, labels (the unlabelled index where a view no longer shows its
    image's class), teacher targets, the dataset rows of each image's views, and the images none of whose views
    could be made."""

    keys: list[str]
    labels: list[int]
    targets: TargetRows
    groups: list[list[int]]
    lost: list[str]


def view_set(plan: ViewPlan, store: EmbeddingStore, paths: list[str], labels: list[int], identity: str | None,
             unlabelled: int, root: str | Path | None = None, first: int = 0,
             partners: set[str] | None = None) -> ViewSet:
    """The views of ``paths`` (each a training image of ``plan``) that show only training images: a view whose
    CutMix partner is not among ``paths`` (say, of an unseen class) is left out, so the student never sees it.
    ``root``: where ``paths`` are now; they must be the files whose views the store holds. ``first``: the first
    view index taken (1: the views other than the image itself); ``partners``: the images a partner may be
    (default: ``paths``)."""
    pos = plan._index()
    missing = [p for p in paths if p not in pos]
    if missing:
        raise ClipkdError(f"store {store.root} has no views of {len(missing)} of the {len(paths)} training images "
                          f"(e.g. {missing[:3]}); embed them with embed-images --views (was it built from another "
                          "folder?)")
    if root is not None:
        plan.check_files(root, paths, f"store of views {store.root}")
    allowed = set(paths) if partners is None else partners
    keys, owner, keeps = [], [], []
    for i, p in enumerate(paths):
        pi = pos[p]
        for k in range(first, plan.views):
            j = plan.partner[pi][k]
            if j >= 0 and plan.images[j] not in allowed:
                continue
            keys.append(plan.key(pi, k))
            owner.append(i)
            keeps.append(plan.keeps_label(pi, k))
    total = len(paths) * (plan.views - first)
    if len(keys) < total:
        log.info("%d of %d views left out: their partner image is not a training image", total - len(keys), total)
    found = store.targets(keys, teacher=identity, what="views")
    kept = found.keep.tolist()
    groups: list[list[int]] = [[] for _ in paths]
    for row, n in enumerate(kept):
        groups[owner[n]].append(row)
    lost = [paths[i] for i, g in enumerate(groups) if not g]  # undecodable: none of its views could be made
    others = sum(1 for n in range(len(keys)) if groups[owner[n]]) - len(kept)
    if others:
        log.warning("%d views of other images were left out: their partner image could not be decoded", others)
    # a mixed or recoloured view is no longer of its image's class: its label is ignored; the label term, if any,
    # trains on the views that keep it
    view_labels = [labels[owner[n]] if keeps[n] else unlabelled for n in kept]
    return ViewSet([keys[n] for n in kept], view_labels, found.targets, groups, lost)


def load_labelled_or_plain(images: str | Path) -> LabelledImages:
    """An unlabelled pool: a folder of images (any layout), an image list or WebDataset shards; labels are
    ignored."""
    from ..data.sources import open_source

    src = open_source(images, "pool images")
    return LabelledImages(src.root, src.keys, [], [])


def _label_map(classnames: list[str], trained: list[str]) -> torch.Tensor:
    pos = {c: i for i, c in enumerate(trained)}
    return torch.tensor([pos.get(c, -100) for c in classnames], dtype=torch.long)


@dataclass
class RunInfo:
    """What a student run records beside its weights (``run.json``, ``student.pt``) about what it trained on."""

    seen_classes: list[str]
    targets: str | None = None  # views | store+online | store | online (None: the supervised baseline)
    extra_images: int | None = None  # pool images trained on teacher targets alone
    views: int | None = None  # stored views trained on (runs on views)
    teacher_images: int = 0  # teacher forwards before training (the views it embedded); online ones are added after
    skipped_before: list[str] = field(default_factory=list)  # undecodable before training (a view's image)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "skipped_before"}


@dataclass
class Built:
    """A run's parts, built under its folder's lock: the module, the data set, what to record, the sampler (None:
    shuffle the data set)."""

    module: StudentModule
    dataset: ImageDataset
    info: RunInfo
    sampler: Any = None


@dataclass
class TargetSources:
    """Where a distill run's targets come from: the training images left once the store's undecodable ones are out,
    the store rows (plain images, then the pool), the online teacher, the pool's absolute paths, and the teacher's
    identity, embedding size and preprocessing."""

    data: LabelledImages
    targets: TargetRows | None
    online: Any
    extra_paths: list[str]
    identity: str
    dim: int
    preprocess: PreprocessConfig


def target_sources(data: LabelledImages, store: str | Path | None, stored: ViewPlan | None, teacher: str | None,
                   extra_images: str | Path | None, extra_store: str | Path | None, device: str,
                   precision: str) -> TargetSources:
    """The build stage's first step: open the store (plain or of views), load the online teacher, look up the
    training images' and the pool's stored targets."""
    targets = online = None
    extra_paths: list[str] = []
    if stored is not None:
        st = EmbeddingStore(store)
        identity, dim, pre = st.teacher, st.embed_dim, PreprocessConfig.from_dict(st.manifest["preprocess"])
    elif store is not None:
        st = EmbeddingStore(store)
        identity, dim, pre = st.teacher, st.embed_dim, PreprocessConfig.from_dict(st.manifest["preprocess"])
        found = st.targets(data.paths, root=data.root)
        if len(found.keep) < len(data.paths):
            keep = found.keep.tolist()
            data = LabelledImages(data.root, [data.paths[i] for i in keep], [data.labels[i] for i in keep],
                                  data.classnames, data.folders)
        targets = found.targets
        if extra_images is not None:
            extra = load_labelled_or_plain(extra_images)
            got = EmbeddingStore(extra_store).targets(extra.paths, teacher=identity, what="pool images",
                                                      root=extra.root)
            extra_paths = [str((extra.root / extra.paths[i]).resolve()) for i in got.keep.tolist()]
            targets = TargetRows.cat([targets, got.targets])
    if teacher is not None:
        from ..teachers import load_teacher

        online = load_teacher(teacher, device=device, precision=precision)
        if store is not None:
            st.check_teacher(online.identity, hint="the store's targets and the online ones must be one teacher's")
        identity, dim, pre = online.identity, online.embed_dim, online.preprocess_cfg
        if extra_images is not None and store is None:
            extra = load_labelled_or_plain(extra_images)
            extra_paths = [str((extra.root / p).resolve()) for p in extra.paths]
    return TargetSources(data, targets, online, extra_paths, identity, dim, pre)


@dataclass
class DistillParts:
    """What a ``distill`` run trains on, loaded and checked before its folder is taken: the training images and
    their seen classes, where the targets come from, the student's description and input transform, the text
    tensors of the terms that use them, and the items (images, then the pool) with their labels."""

    plan: DistillPlan
    data: LabelledImages
    src: TargetSources
    scfg: StudentConfig
    transform: Callable
    text_seen: torch.Tensor | None
    scale: float
    words: torch.Tensor | None
    paths: list[str]
    labels: list[int]
    label_map: torch.Tensor
    info: RunInfo

    def module(self, teacher: Any, labels_to: torch.Tensor | None = None) -> StudentModule:
        """The Lightning module of this run (``teacher``: the online one, or None when every target is stored)."""
        cfg = self.plan.cfg
        return StudentModule(self.scfg, self.label_map if labels_to is None else labels_to, terms=self.plan.terms,
                             distance=cfg.loss, text=self.text_seen, logit_scale=self.scale, teacher=teacher,
                             lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, vocab=self.words,
                             vocab_scale=cfg.vocab_scale or self.scale, mix="none" if cfg.views else cfg.mix,
                             mix_alpha=cfg.mix_alpha, mix_prob=cfg.mix_prob, mix_mode=cfg.mix_mode)


def prepare_distill(plan: DistillPlan, images: str | Path, store: str | Path | None = None,
                    teacher: str | None = None, text: str | Path | None = None, split: str | Path | None = None,
                    vocab: str | Path | None = None, extra_images: str | Path | None = None,
                    extra_store: str | Path | None = None, device: str = "auto") -> DistillParts:
    """The build stage's loading half: the seen images, the text embeddings, the target sources (store, online
    teacher, pool), every check that ties them to one teacher, and the student's description."""
    cfg, terms, needs = plan.cfg, plan.terms, plan.needs
    data, seen = seen_images(images, split)
    seed_all(cfg.seed)

    text_emb = TextEmbeddings.load(text) if text else None
    if needs & {"text", "vocab"} and text_emb is None:
        raise ClipkdError(f"the distillation term(s) {sorted(n for n in terms if n not in ('embed', 'relation'))} "
                          "need `text` (the teacher's class text embeddings)")
    vocab_emb = TextEmbeddings.load(vocab) if vocab else None

    src = target_sources(data, store, plan.stored, teacher, extra_images, extra_store, device, cfg.precision)
    data, online, identity, dim, pre = src.data, src.online, src.identity, src.dim, src.preprocess
    if text_emb is not None and text_emb.teacher != identity:
        raise ClipkdError(f"text embeddings {text} come from teacher '{text_emb.teacher}', but the image "
                          f"targets from '{identity}'")
    if text_emb is not None and text_emb.embeddings.shape[1] != dim:
        raise ClipkdError(f"text embeddings have size {text_emb.embeddings.shape[1]}, image targets {dim}")
    if vocab_emb is not None and (vocab_emb.teacher != identity or vocab_emb.embeddings.shape[1] != dim):
        raise ClipkdError(f"vocabulary {vocab} comes from '{vocab_emb.teacher}' ({vocab_emb.embeddings.shape[1]}-d), "
                          f"the image targets from '{identity}' ({dim}-d)")

    check_init_and_sparsity(cfg, cfg.student, dim, "embedding")
    size = cfg.image_size or pre.side
    scfg = StudentConfig(arch=cfg.student, out_dim=dim, kind="embedding", image_size=size, mean=pre.mean,
                         std=pre.std, teacher=identity, pretrained=cfg.pretrained)
    if online is not None and not cfg.views:
        augment = T.Compose(augment_ops(size, cfg.augment))
        plain = student_transform(scfg, "none")

        def transform(img):
            view = augment(img)
            return plain(view), online.preprocess(view)
    else:  # a store: plain images (the store's own flips are the student's); views: each view as it was embedded
        transform = student_transform(scfg, "none" if cfg.views else cfg.augment)
    text_seen = torch.from_numpy(text_emb.select(seen).embeddings) if text_emb is not None else None
    scale = cfg.logit_scale or (text_emb.logit_scale if text_emb is not None else 100.0)
    words = None
    if "vocab" in needs:  # every class name (seen and unseen: in GZSL the names are known), plus the extra words
        words = torch.from_numpy(np.concatenate([text_emb.embeddings] + ([vocab_emb.embeddings] if vocab_emb else [])))
    paths, labels = list(data.paths), list(data.labels)
    label_map = _label_map(data.classnames, seen)
    if extra_images is not None:  # unlabelled pool: absolute paths, a label position mapped to -100
        paths += src.extra_paths
        labels += [len(data.classnames)] * len(src.extra_paths)
        label_map = torch.cat([label_map, torch.tensor([-100])])
    info = RunInfo(seen, targets="views" if cfg.views else "store+online" if store and teacher else
                   "store" if store else "online", extra_images=len(paths) - len(data.paths))
    return DistillParts(plan, data, src, scfg, transform, text_seen, scale, words, paths, labels, label_map, info)


def build_distill(parts: DistillParts, out: Path, store: str | Path | None, progress: bool = True) -> Built:
    """The build stage's writing half, under the run folder's lock: the data set (for a run on views, the teacher
    first embeds each view once into ``out/views`` unless the store holds them) and the module."""
    cfg, data, online = parts.plan.cfg, parts.data, parts.src.online
    if not cfg.views:  # rows of the targets follow the paths: each item reads its own row
        dataset = ImageDataset(data.root, parts.paths, parts.transform, labels=parts.labels,
                               targets=parts.src.targets)
        return Built(parts.module(online), dataset, parts.info)
    if parts.plan.stored is None:  # the teacher embeds the views once, into OUT/views
        plan = make_view_plan(parts.paths, cfg.views, cfg.mix, cfg.mix_alpha, cfg.mix_prob,
                              flip=cfg.augment == "flip", seed=cfg.seed, hue_prob=float(cfg.view_hue))
        embed_views(online, data.root, plan, out / "views", batch_size=cfg.batch_size, workers=cfg.workers,
                    progress=progress)  # each rank of a job embeds its share
        barrier()
        views_store, teacher_cost = EmbeddingStore(out / "views"), True
    else:
        plan, views_store, teacher_cost = parts.plan.stored, EmbeddingStore(store), False
    vs = view_set(plan, views_store, parts.paths, parts.labels, parts.src.identity, len(data.classnames),
                  root=data.root)
    dataset = ImageDataset(data.root, vs.keys, parts.transform, labels=vs.labels, opener=plan.opener(data.root),
                           targets=vs.targets)
    info = replace(parts.info, views=len(vs.keys), teacher_images=len(vs.keys) if teacher_cost else 0,
                   skipped_before=list(vs.lost))
    return Built(parts.module(None, torch.cat([parts.label_map, torch.tensor([-100])])), dataset, info,
                 ViewSampler(vs.groups, cfg.seed))


def build_supervised(cfg: TrainConfig, images: str | Path, split: str | Path | None = None) -> Built:
    """``train-supervised``'s build stage: the seen images, a classifier student on their classes, its data set."""
    data, seen = seen_images(images, split)
    check_init_and_sparsity(cfg, cfg.student, len(seen), "classifier")
    seed_all(cfg.seed)
    scfg = StudentConfig(arch=cfg.student, out_dim=len(seen), kind="classifier",
                         image_size=cfg.image_size or 224, classnames=seen, pretrained=cfg.pretrained)
    module = StudentModule(scfg, _label_map(data.classnames, seen), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           warmup=cfg.warmup)
    dataset = ImageDataset(data.root, data.paths, student_transform(scfg, cfg.augment), labels=data.labels)
    return Built(module, dataset, RunInfo(seen))


@dataclass
class Ready:
    """A built run ready for the loop: its loader (the one factory), how many items it draws, the callbacks its
    recipe adds."""

    loader: DataLoader
    items: int
    callbacks: list


def ready_to_fit(built: Built, cfg: TrainConfig) -> Ready:
    """The build stage's last step, for every student run: the loader over the built data set (or its sampler's
    groups), ``init``'s weights and QAT's fake-quantizers in the module, 2:4 sparsity as a callback."""
    module, dataset, sampler = built.module, built.dataset, built.sampler
    loader = make_loader(dataset, cfg.batch_size, shuffle=sampler is None, workers=cfg.workers, drop_last=True,
                         seed=cfg.seed, sampler=sampler)
    n = len(sampler) if sampler is not None else len(dataset)
    if len(loader) == 0:
        raise ClipkdError(f"{n} training images is fewer than one batch of {cfg.batch_size}")
    callbacks = []
    if cfg.sparsity:
        from ..students.sparsity import TwoFourSparsity

        callbacks.append(TwoFourSparsity())
    if cfg.init:
        _load_init(module, cfg.init)
    if cfg.qat:
        from ..students.quantize import prepare_qat

        module.student = prepare_qat(module.student)
    return Ready(loader, n, callbacks)


def _load_init(module: StudentModule, init: str) -> None:
    """Start from a trained student's weights (a resumed run's checkpoint then overrides them)."""
    from ..students.model import load_student

    module.student.load_state_dict(load_student(init, reparameterize=False).state_dict())


def check_init_and_sparsity(cfg: TrainConfig, arch: str, out_dim: int | None, kind: str) -> None:
    """One-line errors, before any work, for ``init`` (a student of this architecture, output and kind) and
    ``sparsity``."""
    if cfg.sparsity not in ("", "2:4"):
        raise ClipkdError(f"`sparsity` takes 2:4 (NVIDIA's structured pattern), got '{cfg.sparsity}'")
    if cfg.qat and not cfg.init:
        raise ClipkdError("`qat` fine-tunes a trained student for INT8: give `init`=RUN (the student to quantize)")
    if cfg.qat and cfg.sparsity:
        raise ClipkdError("`qat` with `sparsity`: fine-tune to 2:4 first, then `qat` `init` that run")
    if cfg.qat or cfg.sparsity:
        import timm

        from ..students.model import reparameterizable

        if timm.is_model(arch) and reparameterizable(timm.create_model(arch, num_classes=0)):
            raise ClipkdError(f"{arch} folds its branches for inference, which would undo "
                              + ("`sparsity`'s 2:4 pattern" if cfg.sparsity else "`qat`'s quantized branches")
                              + ": export the trained student and quantize it (clipkd export --int8) instead")
    if not cfg.init:
        return
    from ..students.model import is_student, load_student

    if not is_student(cfg.init) or Path(cfg.init).suffix == ".onnx":
        raise ClipkdError(f"`init` takes a trained clipkd student (run folder or student.pt), not '{cfg.init}'")
    c = load_student(cfg.init, reparameterize=False).cfg
    if c.arch != arch or c.kind != kind or (out_dim is not None and c.out_dim != out_dim):
        raise ClipkdError(f"`init`={cfg.init} is a {c.kind} {c.arch} with {c.out_dim} outputs; this run trains a "
                          f"{kind} {arch}" + (f" with {out_dim} outputs" if out_dim is not None else ""))
