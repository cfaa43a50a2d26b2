"""``clipkd clip-train``: train or fine-tune a CLIP on image–caption pairs with its contrastive loss,
optionally plus a distillation loss from a larger teacher CLIP (the second seed's workflow)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data.captions import CaptionDataset, check_tokenizer_reads, load_caption_source
from ..data.loader import ImageDataset, make_loader
from ..distributed import ranks
from ..errors import ClipkdError
from ..fileio import write_json
from ..students.losses import kd_needs_text
from .distill import TrainResult
from .modules import ClipModule
from .runs import check_run, claim_run, run_recipe
from .trainer import TrainerSettings, check_train_config, fit, seed_all, skipped_images

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
    workers: int | None = None
    seed: int = 0


def model_spec(model: str, pretrained: str | None = None) -> str:
    """A bare open_clip architecture name (``ViT-B-32``) becomes ``open_clip:ViT-B-32[@pretrained]``."""
    if ":" not in model.split("@")[0] or model.startswith("hf-hub:"):
        model = f"open_clip:{model}"
    if pretrained:
        if "@" in model:
            raise ClipkdError(f"model '{model}' already names its weights; drop --pretrained")
        model = f"{model}@{pretrained}"
    return model


def _val_data(clip: Any, images: str | Path, captions: str | Path, batch_size: int, workers: int | None):
    from ..evaluation.retrieval import labels_from_paths

    source = load_caption_source(images, captions)
    dataset = ImageDataset(source.root, sorted(source.pairs), clip.preprocess, opener=source.opener)
    texts, owner = [], []
    for j, p in enumerate(dataset.paths):
        texts += source.pairs[p]
        owner += [j] * len(source.pairs[p])
    labelled = labels_from_paths(dataset.paths) if source.tsv is None else None
    loader = make_loader(dataset, batch_size, workers=workers)
    return loader, clip.tokenizer(texts), owner, (labelled[0] if labelled else None)


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
) -> TrainResult:
    """Train ``cfg.model`` on captioned images; the result's ``spec`` loads the trained model.

    Distillation is on when ``teacher`` (run online, once per batch) or ``store`` (teacher image
    embeddings computed once by ``embed-images``) is given; the ``affinity`` loss also needs
    ``teacher`` for its text tower. With validation data, retrieval metrics are logged each epoch
    and the best epoch (image→image mAP@10 when images have class folders, else mean recall) is
    the one saved. Weights go to ``out`` in the backend's own format (``open_clip_model.pt`` or
    ``cn_clip_model.pt``); ``out/run.json`` records the recipe and the spec. ``out`` resumes a killed run of
    the same recipe; another recipe there is refused unless ``overwrite``.
    """
    from ..teachers import load_clip, load_teacher

    out = Path(out)
    distilling = teacher is not None or store is not None
    needs_text = distilling and kd_needs_text(cfg.kd_loss)
    check_train_config(cfg)
    if needs_text and teacher is None:
        raise ClipkdError(f"the {cfg.kd_loss} loss compares image–text similarities: pass --teacher SPEC (its text "
                          "tower embeds the captions once; image embeddings may still come from --store)")
    if cfg.freeze_image and cfg.freeze_text:
        raise ClipkdError("freezing both towers leaves nothing to train")
    recipe = run_recipe("clip-train", cfg, images=images, captions=captions, teacher=teacher, store=store,
                        val_images=val_images, val_captions=val_captions)
    check_run(out, recipe, overwrite)
    source = load_caption_source(images, captions)
    seed_all(cfg.seed)
    student = load_clip(cfg.model)
    student.require_text("a contrastive loss")
    check_tokenizer_reads(student, source.captions(), "student model")

    t = load_teacher(teacher, device=device, precision=cfg.precision) if teacher is not None else None
    if t is not None and needs_text:
        t.require_text(f"the {cfg.kd_loss} loss")
        check_tokenizer_reads(t, source.captions(), "teacher")
    online = t is not None and store is None
    transform = student.train_preprocess or student.preprocess
    if online:
        def transform(img, _s=transform, _t=t.preprocess):  # noqa: E306
            return _s(img), _t(img)

    targets = teacher_text = None
    if store is not None:
        from ..store import EmbeddingStore

        if source.tsv is not None:
            raise ClipkdError("an embedding store is built from an image folder; with TSV images use --teacher")
        paths = sorted(source.pairs)
        found = EmbeddingStore(store).targets(paths, t.identity if t is not None else None, "captioned images",
                                              root=source.root)
        if len(found.keep) < len(paths):
            source = replace(source, pairs={paths[i]: source.pairs[paths[i]] for i in found.keep.tolist()})
        targets = found.targets
    dataset = CaptionDataset(source, None, transform, student.tokenizer, targets=targets)
    if t is not None and needs_text:
        teacher_text = t.encode_text(dataset.unique).half()
    teacher_dim = t.embed_dim if t is not None else (int(targets.shape[1]) if targets is not None else 0)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, workers=cfg.workers, drop_last=True, seed=cfg.seed)
    if len(loader) == 0:
        raise ClipkdError(f"{len(dataset)} captioned images is fewer than one batch of {cfg.batch_size}")

    val = val_texts = val_owner = val_labels = None
    monitor = None
    if val_images is not None and val_captions is not None:
        val, val_texts, val_owner, val_labels = _val_data(student, val_images, val_captions, cfg.batch_size,
                                                          cfg.workers)
        monitor = "val/i2i_map@10" if val_labels is not None else "val/mean_recall"
    module = ClipModule(student, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                        kd_loss=cfg.kd_loss if distilling else None, kd_weight=cfg.kd_weight,
                        teacher=t if online else None, teacher_dim=teacher_dim,
                        teacher_scale=t.logit_scale if t is not None else 100.0,
                        teacher_text=teacher_text, freeze_image=cfg.freeze_image, freeze_text=cfg.freeze_text,
                        val_texts=val_texts, val_owner=val_owner, val_labels=val_labels)
    with claim_run(out, recipe, overwrite):
        trainer = fit(module, loader, out, cfg.epochs, val=val, monitor=monitor, device=device, settings=cfg,
                      accumulate=cfg.accumulate, progress=progress)
        skipped = skipped_images(trainer, loader)
        if not ranks().zero:  # rank 0 writes the run's files
            return TrainResult(out, out, spec="", train_images=len(dataset) - len(skipped),
                               skipped_images=len(skipped))
        best = out / "checkpoints" / "best.ckpt"
        if monitor and best.is_file():
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        module.cpu()
        spec = student.save(out)
        info: dict[str, Any] = {
            "train": asdict(cfg), "spec": spec, "images": len(dataset) - len(skipped),
            "distillation": {"teacher": t.identity if t is not None else None, "store": str(store) if store else None,
                             "source": "online" if online else ("store" if store else None),
                             "loss": cfg.kd_loss if distilling else None,
                             "weight": cfg.kd_weight if distilling else 0, "projection": module.proj is not None},
            "skipped_images": len(skipped), "skipped": skipped[:1000],
        }
        if monitor:
            cb = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == monitor]
            info["best"] = {"monitor": monitor, "score": float(cb[0].best_model_score) if cb and
                            cb[0].best_model_score is not None else None}
        write_json(out / "run.json", info)
    return TrainResult(out, Path(spec.split("@", 1)[1]) if "@" in spec else Path(spec.split(":", 1)[1]), spec=spec,
                       train_images=len(dataset) - len(skipped), skipped_images=len(skipped), best=info.get("best"))
