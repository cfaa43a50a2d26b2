"""Decoding one image as 8-bit RGB, the way a viewer shows it: files and WebDataset samples alike. No PyTorch here
(the loader factory, :mod:`clipkd.data.loader`, and the lean search server both decode through it)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .tars import read_member, tar_member_path


def to_rgb(img: Image.Image) -> Image.Image:
    """Any image Pillow opens as 8-bit RGB, the way a viewer shows it.

    EXIF orientation is applied; 16-bit and 32-bit integer images are scaled from their bit depth (Pillow's own
    ``convert`` clips them, turning a 16-bit photo white); float images are read as 0..1 when they lie there,
    else clipped to 0..255; palette images with transparency, LA and RGBA are composited over white; CMYK and
    YCbCr go through Pillow's conversion.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode != "I" or a.max(initial=0) > 255 else 255.0
        if mode == "I" and a.max(initial=0) > 65535:
            peak = 2.0**32 - 1
        img = Image.fromarray(np.clip(np.rint(a / peak * 255.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image file, or a sample of a WebDataset shard (``.../shard.tar/key``), as 8-bit RGB
    (:func:`to_rgb`); for JPEGs, ``draft_size`` lets the decoder skip detail we resize away."""
    member = tar_member_path(path) if ".tar/" in str(path) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(read_member(*member)) if member is not None else path)
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    return to_rgb(img)
