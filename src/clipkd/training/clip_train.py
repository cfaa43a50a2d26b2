"""``clipkd clip-train``: train or fine-tune a CLIP on image–caption pairs with its contrastive loss,
optionally plus a distillation loss from a larger teacher CLIP (the second seed's workflow)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.captions import CaptionDataset, check_tokenizer_reads, load_caption_source
from ..data.loader import ImageDataset, make_loader
from ..distributed import ranks
from ..errors import ClipkdError
from ..fileio import check_torch_file, ref, write_json
from ..students.losses import kd_needs_text
from .build import view_set
from .inherit import inherit_weights
from .modules import ClipModule
from .recipe import TrainerSettings, TrainResult, check_train_config, seed_all
from .resolve import store_views
from .runs import check_run, claim_run, run_recipe
from .trainer import fit, skipped_images

log = logging.getLogger(__name__)


@dataclass
class ClipTrainConfig(TrainerSettings):
    """CLIP (fine-)tuning recipe; ``model``: ``open_clip:ARCH[@TAG|@FILE]`` or ``cn_clip:ARCH[@FILE|@random]``."""

    model: str = "open_clip:clipkd-tiny"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    accumulate: int = 1
    freeze_image: bool = False
    freeze_text: bool = False
    kd_loss: str = "cosine"
    kd_weight: float = 0.5
    kd_text_weight: float = 0.0  # text-tower KD: the student's caption embeddings onto the teacher's (needs teacher)
    inherit: str = ""  # a CLIP spec whose weights start the student where names match (TinyCLIP's inheritance)
    workers: int | None = None
    seed: int = 0


def _inherit_source(model: str) -> torch.nn.Module:
    """The CLIP network ``inherit`` names (a spec or a clip-train run folder)."""
    from ..models import load_image_model

    clip = load_image_model(model, device="cpu", precision="fp32").clip
    if clip is None:
        raise ClipkdError(f"`inherit` takes a CLIP (spec or clip-train run) of the student's family, not '{model}'")
    return clip.model


def model_spec(model: str, pretrained: str | None = None) -> str:
    """A bare open_clip architecture name (``ViT-B-32``) becomes ``open_clip:ViT-B-32[@pretrained]``."""
    if ":" not in model.split("@")[0] or model.startswith("hf-hub:"):
        model = f"open_clip:{model}"
    if pretrained:
        if "@" in model:
            raise ClipkdError(f"model '{model}' already names its weights; drop `pretrained`")
        model = f"{model}@{pretrained}"
    return model


def _val_data(clip: Any, images: str | Path, captions: str | Path, batch_size: int, workers: int | None):
    from ..data.folders import labels_from_paths

    source = load_caption_source(images, captions)
    dataset = ImageDataset(source.root, sorted(source.pairs), clip.preprocess, opener=source.opener)
    texts, owner = [], []
    for j, p in enumerate(dataset.paths):
        texts += source.pairs[p]
        owner += [j] * len(source.pairs[p])
    labelled = labels_from_paths(dataset.paths) if source.tsv is None else None
    loader = make_loader(dataset, batch_size, workers=workers)
    return loader, clip.tokenizer(texts), owner, (labelled[0] if labelled else None)


@dataclass
class KdItems:
    """Items trained with the distillation term alone: their keys (views ``path#view=k``, or image paths), their
    teacher targets, the key groups one of which is drawn per epoch, and the view plan that composes them."""

    keys: list[str] = field(default_factory=list)
    targets: Any = None
    groups: list[list[int]] = field(default_factory=list)
    plan: Any = None

    def add(self, other: KdItems) -> KdItems:
        from ..store import TargetRows

        if self.plan is not None and other.plan is not None and (other.plan.settings(), other.plan.images) != (
                self.plan.settings(), self.plan.images):
            raise ClipkdError("the captioned images' views and the extra images' views come from two stores of "
                              "views; embed both into one (embed-images --views over the folder holding both)")
        off = len(self.keys)
        return KdItems(self.keys + other.keys,
                       other.targets if self.targets is None else TargetRows.cat([self.targets, other.targets]),
                       self.groups + [[off + i for i in g] for g in other.groups], self.plan or other.plan)


def view_items(plan: Any, store: Any, images: list[str], identity: str | None, root: str | Path,
               first: int = 0) -> KdItems:
    """Views ``first..K-1`` of each of ``images`` (keys of ``plan``, files under ``root``) with their stored targets,
    one group per image; any image of the plan may be a partner (a collection to search has no unseen class)."""
    vs = view_set(plan, store, images, [0] * len(images), identity, 0, root=root, first=first,
                  partners=set(plan.images))
    return KdItems(vs.keys, vs.targets, [g for g in vs.groups if g], plan)


def extra_items(extra_images: str | Path, store: str | Path, source: Any, identity: str | None) -> KdItems:
    """The uncaptioned images of ``extra_images`` (those not among the captioned ones) with their teacher targets
    from ``store``: every stored view of each when it is a store of views, else the image itself."""
    from ..data.sources import open_source
    from ..store import EmbeddingStore

    src = open_source(extra_images, "extra images")
    same_root = src.root.resolve() == Path(source.root).resolve()
    have = set(source.pairs) if same_root else set()
    images = [k for k in dict.fromkeys(src.keys) if k not in have]
    if not images:
        raise ClipkdError(f"every image of {extra_images} is captioned: nothing for `extra_images` to add")
    st = EmbeddingStore(store)
    plan = store_views(store)
    if plan is not None:
        if not same_root:
            raise ClipkdError(f"the views of {extra_images} are composed under `images` ({source.root}); keep the "
                              "extra images in that folder, or give `extra_store` a store of their plain images")
        return view_items(plan, st, images, identity, source.root)
    found = st.targets(images, teacher=identity, what="extra images", root=src.root, fingerprint=src.fingerprint)
    keys = [images[i] if same_root else str((src.root / images[i]).resolve()) for i in found.keep.tolist()]
    return KdItems(keys, found.targets, [[i] for i in range(len(keys))])


def store_targets(source: Any, store: str | Path | None, extra_images: str | Path | None,
                  extra_store: str | Path | None, identity: str | None, cfg: ClipTrainConfig
                  ) -> tuple[Any, Any, KdItems, Any]:
    """The stored teacher targets of a ``clip-train`` run: the captioned images' (their view 0 in a store of views;
    those the store could not decode left out of ``source``), the items for the distillation term alone (the
    captioned images' other views, the extra images), and the opener that decodes them all."""
    from ..store import EmbeddingStore, TargetRows

    targets, kd, opener = None, KdItems(), None
    if store is not None:
        if source.tsv is not None:
            raise ClipkdError("an embedding store is built from an image folder; with TSV images use `teacher`")
        paths = sorted(source.pairs)
        stored = store_views(store)
        keys = [stored.key(stored._index()[p], 0) if stored and p in stored._index() else p for p in paths]
        found = EmbeddingStore(store).targets(keys, identity, "captioned images", root=None if stored else source.root)
        if len(found.keep) < len(paths):
            source = replace(source, pairs={paths[i]: source.pairs[paths[i]] for i in found.keep.tolist()})
        targets = found.targets
        if stored is not None:  # the captioned images' other views: the distillation term alone
            kd = kd.add(view_items(stored, EmbeddingStore(store), sorted(source.pairs), identity, source.root,
                                   first=1))
    if extra_images is not None:
        kd = kd.add(extra_items(extra_images, extra_store or store, source, identity))
    if kd.keys and (ranks().world > 1 or cfg.devices not in (1, "1") or cfg.num_nodes > 1):
        raise ClipkdError("stored views and `extra_images` train on one process for now (the contrastive batch of "
                          "several ranks must be the same size on each)")
    if kd.keys:
        from ..data.views import ViewOrFileOpener

        targets = TargetRows.cat([targets, kd.targets])
        opener = ViewOrFileOpener(kd.plan, source.root)
    return source, targets, kd, opener


def clip_train(
    images: str | Path,
    captions: str | Path,
    out: str | Path,
    cfg: ClipTrainConfig,
    teacher: str | None = None,
    store: str | Path | None = None,
    val_images: str | Path | None = None,
    val_captions: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool | str = False,
    extra_images: str | Path | None = None,
    extra_store: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on captioned images; the result's ``spec`` loads the trained model.

    **Views and uncaptioned images** (the second seed's setting: a captioned fine-tuning set and a large collection
    to search): with ``store`` a store of views (``embed-images --views``) over ``images``, each captioned image
    trains the contrastive and distillation terms on itself and the distillation term alone on one of its stored
    views per epoch; ``extra_images`` (a folder, list or shards without captions — e.g. the gallery to be searched)
    train the distillation term alone, one view (or the image) each per epoch, with targets from ``extra_store``
    (default: ``store``, when the images lie under ``images``).

    Distillation is on when ``teacher`` (run online, once per batch) or ``store`` (teacher image
    embeddings computed once by ``embed-images``) is given; the ``affinity`` loss also needs
    ``teacher`` for its text tower. With validation data, retrieval metrics are logged each epoch
    and the best epoch (image→image mAP@10 when images have class folders, else mean recall) is
    the one saved. Weights go to ``out`` in the backend's own format (``open_clip_model.pt`` or
    ``cn_clip_model.pt``); ``out/run.json`` records the recipe and the spec. ``out`` resumes a killed run of
    the same recipe; another recipe there is refused unless ``overwrite``.
    """
    out, store, extra_store, teacher = Path(out), ref(store), ref(extra_store), ref(teacher)
    plan = resolve_clip_train(cfg, teacher=teacher, store=store, extra_images=extra_images, extra_store=extra_store)
    recipe = run_recipe("clip-train", cfg, images=images, captions=captions, teacher=teacher, store=store,
                        val_images=val_images, val_captions=val_captions,
                        **({"extra_images": extra_images, "extra_store": extra_store} if extra_images else {}))
    check_run(out, recipe, overwrite)
    run = build_clip_run(plan, images, captions, teacher=teacher, store=store, extra_images=extra_images,
                         extra_store=extra_store, val_images=val_images, val_captions=val_captions, device=device)
    with claim_run(out, recipe, overwrite):
        trainer = fit(run.module, run.loader, out, cfg.epochs, val=run.val, monitor=run.monitor, device=device,
                      settings=cfg, accumulate=cfg.accumulate, progress=progress)
        return _save_clip_run(plan, run, trainer, out, store)


@dataclass
class ClipPlan:
    """A checked ``clip-train`` plan, before any image or model loads: the recipe, whether it distils, and whether
    its distillation loss compares image–text similarities (the teacher's text tower embeds the captions)."""

    cfg: ClipTrainConfig
    distilling: bool
    needs_text: bool


def resolve_clip_train(cfg: ClipTrainConfig, teacher: str | None = None, store: str | Path | None = None,
                       extra_images: str | Path | None = None, extra_store: str | Path | None = None) -> ClipPlan:
    """Every check of a ``clip-train`` call that needs no image or model: one-line errors naming the fields."""
    distilling = teacher is not None or store is not None
    needs_text = distilling and (kd_needs_text(cfg.kd_loss) or cfg.kd_text_weight > 0)
    check_train_config(cfg)
    if cfg.kd_text_weight < 0:
        raise ClipkdError(f"`kd_text_weight` must be ≥ 0, got {cfg.kd_text_weight}")
    if cfg.kd_text_weight > 0 and teacher is None:
        raise ClipkdError("`kd_text_weight` distils the text tower: pass `teacher`=SPEC (its text tower embeds the "
                          "captions once; image embeddings may still come from `store`)")
    if needs_text and teacher is None:
        raise ClipkdError(f"the {cfg.kd_loss} loss compares image–text similarities: pass `teacher`=SPEC (its text "
                          "tower embeds the captions once; image embeddings may still come from `store`)")
    if cfg.freeze_image and cfg.freeze_text:
        raise ClipkdError("freezing both towers leaves nothing to train")
    if extra_images is not None and store is None and extra_store is None:
        raise ClipkdError("`extra_images` are trained on the teacher's embeddings alone: give `store` (a store over "
                          "`images` that holds them) or `extra_store` (theirs)")
    if extra_images is not None and cfg.kd_loss and kd_needs_text(cfg.kd_loss):
        raise ClipkdError(f"the {cfg.kd_loss} loss compares image–text similarities; images without captions need an "
                          "image-embedding loss (`kd_loss`=mse or cosine)")
    return ClipPlan(cfg, distilling, needs_text)


@dataclass
class ClipRun:
    """A ``clip-train`` run's parts: the CLIP being trained, its teacher (when run online or for text), the data
    and its loader, the Lightning module, and the validation data with the metric that picks the best epoch."""

    student: Any
    teacher: Any
    online: bool
    dataset: CaptionDataset
    loader: Any
    module: ClipModule
    val: Any = None
    monitor: str | None = None
    inherited: dict[str, int] | None = None


def _clip_loader(dataset: CaptionDataset, kd: Any, cfg: Any) -> Any:
    """The training loader: with distillation-only images (``kd.keys``), every captioned image once an epoch and
    one view of each other image (or of its own views)."""
    sampler = None
    if kd.keys:
        from ..data.views import ViewSampler

        n = dataset.n_captioned
        sampler = ViewSampler([[i] for i in range(n)] + [[n + j for j in g] for g in kd.groups], cfg.seed)
        log.info("%d captioned images and %d views / uncaptioned images (%d groups) for the distillation term",
                 n, len(kd.keys), len(kd.groups))
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, workers=cfg.workers, drop_last=True, seed=cfg.seed,
                         sampler=sampler)
    if len(loader) == 0:
        raise ClipkdError(f"{len(dataset)} captioned images is fewer than one batch of {cfg.batch_size}")
    return loader


def build_clip_run(plan: ClipPlan, images: str | Path, captions: str | Path | None, teacher: str | None = None,
                   store: str | Path | None = None, extra_images: str | Path | None = None,
                   extra_store: str | Path | None = None, val_images: str | Path | None = None,
                   val_captions: str | Path | None = None, device: str = "auto") -> ClipRun:
    """Load the captions, the CLIP to train and the teacher; gather the teacher targets (store or online); build
    the data set, its loader and the module."""
    from ..teachers import load_clip, load_teacher

    cfg, needs_text = plan.cfg, plan.needs_text
    source = load_caption_source(images, captions)
    seed_all(cfg.seed)
    student = load_clip(cfg.model)
    student.require_text("a contrastive loss")
    check_tokenizer_reads(student, source.captions(), "student model")
    inherited = None
    if cfg.inherit:
        inherited = inherit_weights(student.model, _inherit_source(cfg.inherit))
        log.info("inherited from %s: %s", cfg.inherit, inherited)

    t = load_teacher(teacher, device=device, precision=cfg.precision) if teacher is not None else None
    if t is not None and needs_text:
        t.require_text(f"the {cfg.kd_loss} loss")
        check_tokenizer_reads(t, source.captions(), "teacher")
    online = t is not None and store is None
    transform = student.train_preprocess or student.preprocess
    if online:
        def transform(img, _s=transform, _t=t.preprocess):  # noqa: E306
            return _s(img), _t(img)

    source, targets, kd, opener = store_targets(source, store, extra_images, extra_store,
                                                t.identity if t is not None else None, cfg)
    dataset = CaptionDataset(source, None, transform, student.tokenizer, targets=targets, kd_keys=kd.keys,
                             opener=opener)
    teacher_text = t.encode_text(dataset.unique).half() if t is not None and needs_text else None
    teacher_dim = t.embed_dim if t is not None else (int(targets.shape[1]) if targets is not None else 0)
    loader = _clip_loader(dataset, kd, cfg)

    val = val_texts = val_owner = val_labels = None
    monitor = None
    if val_images is not None and val_captions is not None:
        val, val_texts, val_owner, val_labels = _val_data(student, val_images, val_captions, cfg.batch_size,
                                                          cfg.workers)
        monitor = "val/i2i_map@10" if val_labels is not None else "val/mean_recall"
    module = ClipModule(student, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                        kd_loss=cfg.kd_loss if plan.distilling else None, kd_weight=cfg.kd_weight,
                        teacher=t if online else None, teacher_dim=teacher_dim,
                        teacher_scale=t.logit_scale if t is not None else 100.0,
                        teacher_text=teacher_text, kd_text_weight=cfg.kd_text_weight if plan.distilling else 0.0,
                        freeze_image=cfg.freeze_image, freeze_text=cfg.freeze_text,
                        val_texts=val_texts, val_owner=val_owner, val_labels=val_labels)
    return ClipRun(student, t, online, dataset, loader, module, val, monitor, inherited)


def _save_clip_run(plan: ClipPlan, run: ClipRun, trainer: Any, out: Path, store: str | Path | None) -> TrainResult:
    """After ``fit``: the best epoch's weights (with validation data) in the backend's own format, and ``run.json``
    (rank 0 writes; the other ranks only report)."""
    cfg, t, distilling = plan.cfg, run.teacher, plan.distilling
    skipped = skipped_images(trainer, run.loader)
    trained = len(run.dataset) - len(skipped)
    if not ranks().zero:  # rank 0 writes the run's files
        return TrainResult(out, out, spec="", train_images=trained, skipped_images=len(skipped))
    best = out / "checkpoints" / "best.ckpt"
    if run.monitor and best.is_file():
        check_torch_file(best, "best checkpoint", "re-run with `overwrite` to train again")
        run.module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    run.module.cpu()
    spec = run.student.save(out)
    info: dict[str, Any] = {
        "train": asdict(cfg), "spec": spec, "images": trained,
        "distillation": {"teacher": t.identity if t is not None else None, "store": str(store) if store else None,
                         "source": "online" if run.online else ("store" if store else None),
                         "loss": cfg.kd_loss if distilling else None,
                         "weight": cfg.kd_weight if distilling else 0, "projection": run.module.proj is not None,
                         "text_weight": run.module.kd_text_weight},
        "skipped_images": len(skipped), "skipped": skipped[:1000],
    }
    if run.inherited is not None:
        info["inherited"] = {"from": cfg.inherit, **run.inherited}
    if run.monitor:
        cb = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == run.monitor]
        info["best"] = {"monitor": run.monitor, "score": float(cb[0].best_model_score) if cb and
                        cb[0].best_model_score is not None else None}
    write_json(out / "run.json", info)
    return TrainResult(out, Path(spec.split("@", 1)[1]) if "@" in spec else Path(spec.split(":", 1)[1]), spec=spec,
                       train_images=trained, skipped_images=len(skipped), best=info.get("best"))
