"""A pool made from nothing: procedurally generated images for GZSL without unlabelled images of the unseen classes.

A student distilled on the seen classes' images learns the teacher's function only on their manifold; unseen
classes lie off it. Images that are none of the classes but share their low-level statistics (strokes, edges,
colour patches, parts of the seen images rearranged), labelled only by the teacher's embedding of them, widen the
inputs the student matches the teacher on. Kinds (:data:`KINDS`):

- ``strokes``: one to four random Bézier strokes of random width and colour on a plain background;
- ``leaves``: a dead-leaves image (random discs and rectangles occluding each other, sizes power-law distributed);
- ``mosaic``: a 2×2 mosaic of random crops of the seen classes' training images, each quarter rotated by a random
  multiple of 90° (needs ``mix_from``; only the seen classes' images when a ``split`` is given).

Every image is a function of ``(seed, kind, index)``: a pool is reproducible, and a killed run resumes where it
stopped (existing files are kept; each is written atomically). ``distill --extra-images DIR`` trains on it with the
teacher's targets (online, or with ``embed-images`` first)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ClipkdError
from ..fileio import atomic_write, read_json, write_json

log = logging.getLogger(__name__)
KINDS = ("strokes", "leaves", "mosaic")
MANIFEST = "procedural.json"


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def strokes(size: int, rng: np.random.Generator) -> Image.Image:
    """1–4 quadratic Bézier strokes (drawn at 4× and downsampled: anti-aliased) on a plain background."""
    big = 4 * size
    dark = rng.random() < 0.5
    bg = tuple(int(v) for v in (rng.integers(0, 60, 3) if dark else rng.integers(190, 256, 3)))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        p = rng.uniform(0.1, 0.9, (3, 2)) * big
        t = np.linspace(0, 1, 32)[:, None]
        curve = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t ** 2 * p[2]
        width = int(rng.uniform(0.04, 0.14) * big)
        ink = _colour(rng) if rng.random() < 0.5 else (tuple(255 - v for v in bg))
        draw.line([tuple(q) for q in curve], fill=ink, width=width, joint="curve")
        for q in (curve[0], curve[-1]):  # round caps
            draw.ellipse([q[0] - width / 2, q[1] - width / 2, q[0] + width / 2, q[1] + width / 2], fill=ink)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def leaves(size: int, rng: np.random.Generator) -> Image.Image:
    """A dead-leaves image: discs and rectangles of power-law radii, later ones occluding earlier ones."""
    img = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 60))):
        r = size * 0.03 / max(rng.random(), 0.03) ** (1 / 2)  # P(radius > x) ∝ x^-2
        r = min(r, size / 2)
        x, y = rng.uniform(0, size, 2)
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=_colour(rng))
    return img


def mosaic(size: int, rng: np.random.Generator, sources: Sequence[Path]) -> Image.Image:
    """Four random crops of random source images, each rotated by a multiple of 90°, as one 2×2 image."""
    half = size // 2
    out = Image.new("RGB", (size, size))
    for k in range(4):
        with Image.open(sources[int(rng.integers(len(sources)))]) as im:
            im = im.convert("RGB").resize((size, size))
        scale = rng.uniform(0.4, 0.8)
        w = max(2, int(scale * size))
        x0, y0 = rng.integers(0, size - w + 1, 2)
        tile = im.crop((int(x0), int(y0), int(x0) + w, int(y0) + w)).resize((half, half))
        tile = tile.rotate(90 * int(rng.integers(4)))
        out.paste(tile, ((k % 2) * half, (k // 2) * half))
    return out


def _seen_images(mix_from: str | Path, split: str | Path | None) -> list[Path]:
    from .datasets import load_labelled
    from .splits import load_split

    data = load_labelled(mix_from)
    keep = range(len(data.paths))
    if split is not None:
        seen = set(load_split(split, data.classnames, data.aliases).seen)
        keep = [i for i in keep if data.classnames[data.labels[i]] in seen]
    paths = [data.root / data.paths[i] for i in keep]
    if not paths:
        raise ClipkdError(f"no seen-class images in {mix_from} to make mosaics of")
    return paths


def make_pool(out: str | Path, images: int, size: int, seed: int = 0, kinds: Sequence[str] | None = None,
              mix_from: str | Path | None = None, split: str | Path | None = None,
              progress: bool = True) -> Path:
    """Write ``images`` procedurally generated ``size``-px PNGs to the folder ``out``, the ``kinds`` in turn
    (module docstring); ``mix_from``: the labelled training images the ``mosaic`` kind crops (with ``split``: only
    the seen classes'). ``kinds`` default: all of them with ``mix_from``, else ``strokes`` and ``leaves``.
    Re-running resumes; a folder made with other settings is refused. Returns ``out``."""
    kinds = list(kinds) if kinds else [k for k in KINDS if k != "mosaic" or mix_from is not None]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ClipkdError(f"unknown procedural kind(s) {bad or kinds}: choose from {', '.join(KINDS)}")
    if images < 1 or size < 8:
        raise ClipkdError(f"a procedural pool needs ≥ 1 image of ≥ 8 px, got {images} of {size} px")
    if "mosaic" in kinds and mix_from is None:
        raise ClipkdError("the `mosaic` kind crops the seen classes' images: give `mix_from` (and `split`)")
    sources = _seen_images(mix_from, split) if "mosaic" in kinds else []
    out = Path(out)
    settings = {"images": images, "size": size, "seed": seed, "kinds": kinds,
                "mosaic_sources": len(sources)}
    if (out / MANIFEST).is_file():
        was = read_json(out / MANIFEST, "procedural pool manifest")
        if {k: was.get(k) for k in settings} != settings:
            raise ClipkdError(f"{out} holds a procedural pool made with other settings ({was}); give another "
                              "folder or delete it")
    elif out.exists() and any(out.iterdir()):
        raise ClipkdError(f"{out} is not empty and is not a procedural pool; give a new folder")
    write_json(out / MANIFEST, settings)
    from tqdm import tqdm

    for i in tqdm(range(images), desc="procedural pool", unit="img", disable=not progress):
        kind = kinds[i % len(kinds)]
        path = out / f"{kind}-{i:07d}.png"
        if path.is_file():
            continue  # written by an earlier (killed) run: the same image, since it is a function of its index
        rng = np.random.default_rng([seed, KINDS.index(kind), i])
        img = mosaic(size, rng, sources) if kind == "mosaic" else strokes(size, rng) if kind == "strokes" \
            else leaves(size, rng)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write(path, lambda f, b=buf.getvalue(): f.write(b))
    return out
