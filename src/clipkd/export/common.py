"""What every export format shares: the result record, the parity threshold, sample images and their batch, a
student run's default sample images, and the portable name an export records as its source."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.images import load_rgb
from ..errors import ClipkdError, first_line

log = logging.getLogger(__name__)

PARITY_MIN = 0.9999
FORMATS = ("onnx", "tensorrt", "timm", "open_clip")  # the last two: folders (:mod:`.folder`)
FOLDER_FORMATS = ("timm", "open_clip")
TOWERS = ("image", "text")  # which tower of a CLIP an ONNX export holds


@dataclass(frozen=True)
class ExportConfig:
    """How :func:`~clipkd.export.export_model` exports (everything apart from the model and ``out``).

    ``format``: one of :data:`FORMATS`; ``images`` / ``samples``: the parity check's images (default: a student
    run's training images); ``int8`` with ``calib`` / ``calib_count``: post-training static quantization;
    ``fp16``: a TensorRT engine's precision; ``tower``: ``image``, or ``text`` (a CLIP's text tower, fp32 ONNX);
    ``text`` / ``results`` / ``license`` / ``push_to_hub``: what a timm or open_clip folder carries."""

    format: str = "onnx"
    images: str | Path | None = None
    samples: int = 16
    int8: bool = False
    calib: str | Path | None = None
    calib_count: int = 128
    fp16: bool = True
    tower: str = "image"
    text: str | Path | None = None
    results: str | Path | None = None
    license: str = "other"
    push_to_hub: str | None = None


@dataclass
class ExportResult:
    """What an export wrote and how close it is to the PyTorch model on the sample images."""

    path: Path
    format: str
    metadata: dict[str, Any]
    samples: int
    min_cosine: float
    mean_cosine: float
    size_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d



def portable_name(model: str | Path) -> str:
    """What an export records as its ``source``: the model's name without the folders of the machine that made it
    (``runs/a/student`` is ``student``; ``open_clip:ViT-B-32@/w/open_clip_model.pt`` is
    ``open_clip:ViT-B-32@open_clip_model.pt``; a hub name stays as it is)."""
    text = str(model)
    head, at, weights = text.rpartition("@")
    if at and ":" in head and ("/" in weights or "\\" in weights):
        return f"{head}@{Path(weights).name}"
    if ":" in text.split("/")[0] and not Path(text).exists():  # backend:name, no file of this machine
        return text
    return Path(text).name if ("/" in text or "\\" in text) else text



def sample_images(images: str | Path, limit: int) -> list[Path]:
    """Up to ``limit`` images of a folder (any layout), an image list or WebDataset shards, in a fixed order."""
    from ..data.sources import open_source

    src = open_source(images, "sample images")
    if src.kind == "tsv":
        raise ClipkdError(f"sample images must be files or shard samples, not rows of a Chinese-CLIP TSV ({images})")
    if not src.keys:
        raise ClipkdError(f"no images under {images}")
    files = [src.root / k for k in src.keys]
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def batch_images(files: list[Path], transform: Any) -> torch.Tensor:
    xs = []
    for f in files:
        try:
            xs.append(transform(load_rgb(f)))
        except Exception as e:  # noqa: BLE001 - a corrupt sample is skipped, not fatal
            log.warning("sample %s skipped: %s", f, first_line(e))
    if not xs:
        raise ClipkdError("none of the sample images could be decoded")
    return torch.stack(xs)


def default_images(model: str | Path) -> Path | None:
    """The training images of a student run (its recipe names them), for parity samples by default."""
    p = Path(model)
    run = p if p.is_dir() else p.parent
    for name in ("recipe.json", "run.json"):
        f = run / name
        if f.is_file():
            try:
                inputs = json.loads(f.read_text()).get("inputs", {})
            except (OSError, json.JSONDecodeError):
                continue
            images = inputs.get("images") if isinstance(inputs, dict) else None
            if isinstance(images, dict):
                images = images.get("path")
            if images and Path(images).exists():
                return Path(images)
    return None
