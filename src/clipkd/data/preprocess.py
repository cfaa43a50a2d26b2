"""Preprocessing as one typed value shared by every backend and student (what an export writes as metadata): a
torchvision transform for training and PyTorch models, and the same steps in numpy for deployed ones (no PyTorch)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ClipkdError

# OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD; a test keeps them equal): stated here so
# that reading a preprocessing config imports neither open_clip nor torch
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's codes, the ones torchvision hands PIL images to


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

        self.check()
        interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}[self.interpolation]
        if self.resize_mode == "squash":
            resize = [T.Resize(self.size, interpolation=interp)]
        else:
            resize = [T.Resize(self.side, interpolation=interp)] + ([T.CenterCrop(self.size)] if self.crop else [])
        return T.Compose(list(augment or []) + resize + [T.ToTensor(), T.Normalize(self.mean, self.std)])

    def check(self) -> None:
        """A one-line error for a resize mode or interpolation clipkd has no transform for."""
        if self.resize_mode not in ("shortest", "squash"):
            raise ClipkdError(f"resize mode '{self.resize_mode}' has no clipkd transform (shortest or squash)")
        if self.interpolation not in RESAMPLE:
            raise ClipkdError(f"interpolation '{self.interpolation}' is not one of {', '.join(RESAMPLE)}")

    def to_array(self, img: Any) -> np.ndarray:
        """:meth:`transform` (without augmentation) in PIL and numpy: an RGB PIL image → a ``(3, H, W)`` float32 array,
        the same numbers torchvision gives (same PIL resize, crop offsets, scaling and normalisation order)."""
        self.check()
        resample = RESAMPLE[self.interpolation]
        w, h = img.size
        if self.resize_mode == "squash":
            new = (self.size[1], self.size[0])
        else:  # torchvision's Resize(int): the shorter side to `side`, the longer one scaled and truncated
            short, long = (w, h) if w <= h else (h, w)
            long = int(self.side * long / short)
            new = (self.side, long) if w <= h else (long, self.side)
        if new != (w, h):
            img = img.resize(new, resample)
        window = None
        if self.resize_mode == "shortest" and self.crop:
            (w, h), (ch, cw) = img.size, self.size
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            if 0 <= top <= h - ch and 0 <= left <= w - cw:
                window = (slice(top, top + ch), slice(left, left + cw))  # a view of the pixels: no copy
            else:  # a crop past the image pads it (as torchvision's CenterCrop does)
                img = img.crop((left, top, left + cw, top + ch))
        a = np.asarray(img)
        if window is not None:
            a = a[window]
        if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == len(self.mean) == 3:
            # each channel's 256 values normalised once (the same float32 operations, so the same numbers)
            lut, planes = _lookup(self.mean, self.std), np.ascontiguousarray(a.transpose(2, 0, 1))
            out = np.empty(planes.shape, np.float32)
            for c in range(3):
                np.take(lut[c], planes[c], out=out[c])
            return out
        x = np.asarray(a, dtype=np.float32) / 255
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


@functools.lru_cache(maxsize=16)
def _lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(channels, 256) float32: ``(v / 255 - mean) / std`` for every 8-bit value ``v``, computed with the float32
    operations :meth:`PreprocessConfig.to_array` applies pixel by pixel."""
    v = np.arange(256, dtype=np.float32)[:, None] / 255
    lut = (v - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(lut.T)
