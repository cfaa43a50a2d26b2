"""Preprocessing as one typed value shared by every backend and student (what an export writes as metadata)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ..errors import ClipkdError

CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its images: resize to ``size`` (height, width), optionally center-crop, normalise.

    ``resize_mode``: ``shortest`` (shorter side to the size, then ``crop``), ``squash`` (stretch to the
    size) or ``longest`` (open_clip's pad-to-square); ``interpolation``: ``bicubic``/``bilinear``/``nearest``.
    ``processor`` names a backend's own image processor when it is not expressible by the fields above.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    crop: bool = True
    processor: str = ""

    @property
    def side(self) -> int:
        """The larger input side (what a square student is built for)."""
        return int(max(self.size))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (lists, not tuples), as stores, run files and export metadata record it."""
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PreprocessConfig:
        """Read :meth:`to_dict` output, or the older free-form dicts (``size`` as an int, extra keys)."""
        d = dict(d or {})
        size = d.get("size") or cls.size
        size = (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[-1]))
        return cls(size=size, mean=tuple(d.get("mean") or CLIP_MEAN), std=tuple(d.get("std") or CLIP_STD),
                   interpolation=str(d.get("interpolation") or "bicubic"),
                   resize_mode=str(d.get("resize_mode") or "shortest"), crop=bool(d.get("crop", True)),
                   processor=str(d.get("processor") or ""))

    def transform(self, augment: list | None = None):
        """A torchvision transform: ``augment`` (PIL-level ops) → resize → crop → tensor → normalise."""
        from torchvision import transforms as T

        if self.resize_mode not in ("shortest", "squash"):
            raise ClipkdError(f"resize mode '{self.resize_mode}' has no clipkd transform (shortest or squash)")
        interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}[self.interpolation]
        if self.resize_mode == "squash":
            resize = [T.Resize(self.size, interpolation=interp)]
        else:
            resize = [T.Resize(self.side, interpolation=interp)] + ([T.CenterCrop(self.size)] if self.crop else [])
        return T.Compose(list(augment or []) + resize + [T.ToTensor(), T.Normalize(self.mean, self.std)])
