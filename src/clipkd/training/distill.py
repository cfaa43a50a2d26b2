"""``clipkd distill`` and ``clipkd train-supervised``: students trained on the seen classes only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from ..data.datasets import seen_images
from ..data.folders import LabelledImages
from ..data.loader import ImageDataset, make_loader
from ..data.preprocess import PreprocessConfig
from ..data.views import ViewPlan, ViewSampler, count_views, make_view_plan, resolve_view_hue
from ..distributed import barrier, gather_objects, ranks
from ..errors import ClipkdError
from ..fileio import ref, write_json
from ..prompts import TextEmbeddings
from ..store import EmbeddingStore, TargetRows, embed_views
from ..students.losses import EMBEDDING_LOSSES, check_terms, term_needs
from ..students.model import StudentConfig, augment_ops, check_student_arch, save_student, student_transform
from .modules import StudentModule
from .runs import check_run, claim_run, run_recipe
from .trainer import TrainerSettings, check_logger, check_train_config, fit, seed_all, skipped_images

log = logging.getLogger(__name__)


MIXES = ("auto", "none", "mixup", "cutmix")  # `mix`: how training images are mixed
MIX_MODES = ("elem", "batch")  # `mix_mode`: a box and ratio per image, or one per batch
AUGMENTS = ("none", "flip", "crop")  # `augment`: the student's online augmentation
AUTO_VIEWS = 4  # views per image of clipkd's GZSL method by default (the image + 3 flipped CutMix composites)


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


def _fit_and_save(build: Callable[[], Built], out: Path, cfg: TrainConfig, device: str, progress: bool,
                  recipe: dict[str, Any], overwrite: bool | str) -> TrainResult:
    """The part every student run shares: hold the run folder, ``build()`` the module and data set (work that
    writes into the folder happens there, under its lock), the one loader and training loop, ``student.pt`` +
    ``run.json``."""
    with claim_run(out, recipe, overwrite):
        built = build()
        module, dataset, sampler = built.module, built.dataset, built.sampler
        loader = make_loader(dataset, cfg.batch_size, shuffle=sampler is None, workers=cfg.workers, drop_last=True,
                             seed=cfg.seed, sampler=sampler)
        n = len(sampler) if sampler is not None else len(dataset)
        if len(loader) == 0:
            raise ClipkdError(f"{n} training images is fewer than one batch of {cfg.batch_size}")
        extra = []
        if cfg.sparsity:
            from ..students.sparsity import TwoFourSparsity

            extra.append(TwoFourSparsity())
        if cfg.init:
            _load_init(module, cfg.init)
        if cfg.qat:
            from ..students.quantize import prepare_qat

            module.student = prepare_qat(module.student)
        trainer = fit(module, loader, out, cfg.epochs, device=device, settings=cfg, progress=progress,
                      callbacks=extra)
        during = skipped_images(trainer, loader)
        skipped = built.info.skipped_before + during  # undecodable before training (views) or by the loader
        trained = n - len(during)
        info = {"train": asdict(cfg), **built.info.to_dict(), "train_images": trained, "skipped_images": len(skipped),
                "skipped": skipped[:1000]}
        # teacher forwards: online (every rank's), or the views it embedded; 0 from a store
        info["teacher_images"] = built.info.teacher_images + sum(gather_objects(module.teacher_images))
        path = out / ("student.int8.onnx" if cfg.qat else "student.pt")
        if not ranks().zero:  # rank 0 writes the run's files
            return TrainResult(out, path, train_images=trained, skipped_images=len(skipped))
        if cfg.sparsity:
            from ..students.sparsity import sparsity_report

            info["sparsity"] = sparsity_report(module.student)
        if cfg.qat:
            path, info["qat"] = _export_qat(module, dataset, out)
        else:
            path = save_student(out / "student.pt", module.student.cpu(), extra=info)
        write_json(out / "run.json", {**info, "student": asdict(module.student.cfg)})
    return TrainResult(out, path, train_images=trained, skipped_images=len(skipped))


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


def _export_qat(module: StudentModule, dataset: ImageDataset, out: Path) -> tuple[Path, dict[str, Any]]:
    """The QAT run's product: ``student.int8.onnx``, checked against its PyTorch graph on training images."""
    from ..students.onnx import student_metadata
    from ..students.quantize import export_qat_onnx

    images = []
    for i in range(min(len(dataset), 64)):
        item = dataset[i]["image"]
        if item is not None:
            images.append(item[0] if isinstance(item, tuple) else item)
        if len(images) == 8:
            break
    path = out / "student.int8.onnx"
    lo = export_qat_onnx(module.student, path, student_metadata(module.student.cfg, str(out.resolve())),
                         check=torch.stack(images) if images else None)
    return path, {"onnx": str(path), "min_cosine_onnx_vs_pytorch": lo}


def _load_init(module: StudentModule, init: str) -> None:
    """Start from a trained student's weights (a resumed run's checkpoint then overrides them)."""
    from ..students.model import load_student

    module.student.load_state_dict(load_student(init, reparameterize=False).state_dict())


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
    return _fit_and_save(lambda: build_distill(parts, out, store, progress), out, plan.cfg, device, progress, recipe,
                         overwrite)


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
    out = Path(out)
    check_logger(cfg.logger)
    check_train_config(cfg)
    check_student_arch(cfg.student)
    recipe = run_recipe("train-supervised", cfg, images=images, split=split)
    check_run(out, recipe, overwrite)
    data, seen = seen_images(images, split)
    check_init_and_sparsity(cfg, cfg.student, len(seen), "classifier")
    seed_all(cfg.seed)
    scfg = StudentConfig(arch=cfg.student, out_dim=len(seen), kind="classifier",
                         image_size=cfg.image_size or 224, classnames=seen, pretrained=cfg.pretrained)
    module = StudentModule(scfg, _label_map(data.classnames, seen), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           warmup=cfg.warmup)
    dataset = ImageDataset(data.root, data.paths, student_transform(scfg, cfg.augment), labels=data.labels)
    return _fit_and_save(lambda: Built(module, dataset, RunInfo(seen)), out, cfg, device, progress, recipe,
                         overwrite)
