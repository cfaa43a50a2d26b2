"""``clipkd clip-train``: train (or fine-tune) an open_clip model on image–caption pairs with ``ClipLoss``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch

from ..data.captions import CaptionDataset, read_captions
from ..data.loader import make_loader
from ..errors import ClipkdError
from ..fileio import write_json, write_torch
from ..teachers.openclip import MODEL_CONFIGS  # noqa: F401  (registers clipkd's model configs)
from .modules import ClipModule
from .trainer import fit


@dataclass
class ClipTrainConfig:
    """CLIP training recipe."""

    model: str = "clipkd-tiny"
    pretrained: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    workers: int | None = None
    seed: int = 0


def clip_train(
    images: str | Path,
    captions: str | Path,
    out: str | Path,
    cfg: ClipTrainConfig,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> str:
    """Train ``cfg.model`` on the ``path,caption`` pairs; return the teacher spec of the result.

    The weights are saved as ``out/open_clip_model.pt`` (a plain open_clip state dict), so the
    result loads as ``open_clip:MODEL@out/open_clip_model.pt`` anywhere a teacher spec is taken.
    """
    out = Path(out)
    pairs, missing = read_captions(captions, images)
    if missing:
        print(f"note: {len(missing)} captioned image(s) not found under {images} were left out, "
              f"e.g. {missing[:3]}")
    torch.manual_seed(cfg.seed)
    if cfg.model not in open_clip.list_models():
        raise ClipkdError(f"open_clip has no model '{cfg.model}'")
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        cfg.model, pretrained=cfg.pretrained, output_dict=True
    )
    tokenizer = open_clip.get_tokenizer(cfg.model)
    dataset = CaptionDataset(images, pairs, preprocess_train, tokenizer)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, workers=cfg.workers, drop_last=True,
                         seed=cfg.seed)
    if len(loader) == 0:
        raise ClipkdError(f"{len(dataset)} captioned images is fewer than one batch of {cfg.batch_size}")
    module = ClipModule(model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup)
    fit(module, loader, out, cfg.epochs, device=device, precision=precision, progress=progress)
    weights = out / "open_clip_model.pt"
    write_torch(weights, {k: v.cpu() for k, v in module.model.state_dict().items()})
    spec = f"open_clip:{cfg.model}@{weights}"
    write_json(out / "run.json", {"train": asdict(cfg), "teacher_spec": spec, "images": len(dataset)})
    return spec
