"""Decoding one image as 8-bit RGB, the way a viewer shows it: files, WebDataset samples and the rows of a
Chinese-CLIP TSV alike. No PyTorch here (the loader factory, :mod:`clipkd.data.loader`, and the lean search server
both decode through it)."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import ClipkdError
from ..fileio import data_fingerprint
from .tars import read_member, tar_member_path


def to_rgb(img: Image.Image) -> Image.Image:
    """Any image Pillow opens as 8-bit RGB, the way a viewer shows it.

    EXIF orientation is applied; 16-bit and 32-bit integer images are scaled from their bit depth (Pillow's own
    ``convert`` clips them, turning a 16-bit photo white); float images are read as 0..1 when they lie there,
    else clipped to 0..255; palette images with transparency, LA and RGBA are composited over white; CMYK and
    YCbCr go through Pillow's conversion. An upright RGB image is returned as it is (no copy: a query decoded for
    search is not copied twice on its way to the model).
    """
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even an upright image
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
    return img if img.mode == "RGB" else img.convert("RGB")


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


class TsvImages:
    """Random access to the base64 images of a Chinese-CLIP ``*_imgs.tsv`` by image id (picklable)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ClipkdError(f"image TSV not found: {self.path}")
        self.offsets: dict[str, int] = {}
        bad = 0
        with self.path.open("rb") as f:
            pos = 0
            for line in f:
                key, sep, _ = line.partition(b"\t")
                if sep and key.strip():
                    self.offsets[key.decode("utf-8", "replace").strip()] = pos
                else:
                    bad += line.strip() != b""
                pos += len(line)
        if not self.offsets:
            raise ClipkdError(f"{self.path} has no 'image_id<TAB>base64' lines")
        self.malformed_lines = bad
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}

    def open(self, image_id: str) -> Image.Image:
        """Decode one image (raises on broken base64 or image data; the loader counts it as skipped)."""
        if self._file is None:
            self._file = self.path.open("rb")
        self._file.seek(self.offsets[image_id])
        _, _, data = self._file.readline().partition(b"\t")
        img = Image.open(io.BytesIO(base64.b64decode(data.strip(), validate=True)))
        img.load()
        return to_rgb(img)

    def fingerprint(self, image_id: str) -> int:
        """The content fingerprint of one row's image (its base64 text: first and last 4 KiB, length), what a store
        records to tell this row from another TSV's row of the same id (-1: no such row)."""
        if image_id not in self.offsets:
            return -1
        if self._file is None:
            self._file = self.path.open("rb")
        self._file.seek(self.offsets[image_id])
        data = self._file.readline().partition(b"\t")[2].strip()
        return data_fingerprint(data)
