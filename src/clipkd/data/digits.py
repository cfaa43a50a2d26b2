"""Real-image GZSL worlds that install offline: scikit-learn's handwritten digits (1,797 scans, 8×8 px).

``digits``: ten classes (``zero`` … ``nine``), some held out as unseen. ``digits-colour``: each scan inked in
one of four colours, 40 classes such as ``red seven``; one colour per digit is held out, so every colour and
every digit occurs among the seen classes but the pair does not (compositional zero-shot on real strokes).
Each world is an ImageFolder per split with ``captions_en.csv`` (for training a CLIP teacher on every class,
standing in for a pretrained one), ``split.json`` and ``world.json``, like the demo world.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ClipkdError
from ..fileio import read_json, write_json, write_text
from .splits import Split, write_split

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INKS = {"red": (230, 40, 40), "green": (40, 200, 70), "blue": (60, 100, 240), "yellow": (235, 215, 40)}
TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand.", "a picture of a {}.")
WORLDS = ("digits", "digits-colour")


@dataclass(frozen=True)
class DigitsConfig:
    """Which digits world, its image size, how many digits are unseen (``digits``), split fractions, seed."""

    kind: str = "digits"
    image_size: int = 32
    unseen: int = 3
    val_fraction: float = 0.1
    test_fraction: float = 0.3
    seed: int = 0


def _classes(cfg: DigitsConfig, rng: np.random.Generator) -> tuple[list[str], Split]:
    if cfg.kind == "digits":
        unseen = sorted(rng.choice(10, cfg.unseen, replace=False).tolist())
        return list(NUMBERS), Split([NUMBERS[d] for d in range(10) if d not in unseen],
                                    [NUMBERS[d] for d in unseen])
    inks = list(INKS)
    names = [f"{c} {n}" for n in NUMBERS for c in inks]
    offset = int(rng.integers(0, len(inks)))
    held = {f"{inks[(d + offset) % len(inks)]} {NUMBERS[d]}" for d in range(10)}
    return names, Split([c for c in names if c not in held], [c for c in names if c in held])


def _render(scan: np.ndarray, size: int, ink: tuple[int, int, int] | None) -> Image.Image:
    grey = Image.fromarray((scan * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    a = np.asarray(grey, dtype=np.float32)[..., None] / 255
    colour = np.array(ink or (255, 255, 255), dtype=np.float32)
    return Image.fromarray(np.clip(a * colour + (1 - a) * 12, 0, 255).astype(np.uint8))


def make_digits_world(out: str | Path, cfg: DigitsConfig = DigitsConfig()) -> Path:
    """Write a digits world into ``out`` (reused when ``world.json`` records the same config)."""
    if cfg.kind not in WORLDS:
        raise ClipkdError(f"unknown digits world '{cfg.kind}' (choose {', '.join(WORLDS)})")
    if not 1 <= cfg.unseen <= 9:
        raise ClipkdError(f"`unseen` must be between 1 and 9 digits, got {cfg.unseen}")
    out = Path(out)
    if (out / "world.json").is_file() and read_json(out / "world.json").get("config") == asdict(cfg):
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(cfg.seed)
    classnames, split = _classes(cfg, rng)
    inks = list(INKS)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == d))
        n_test, n_val = int(len(idx) * cfg.test_fraction), int(len(idx) * cfg.val_fraction)
        parts = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val], "train": idx[n_test + n_val:]}
        for part, ids in parts.items():
            for i in ids.tolist():
                ink = inks[int(rng.integers(0, len(inks)))] if cfg.kind == "digits-colour" else None
                name = f"{ink} {NUMBERS[d]}" if ink else NUMBERS[d]
                rel = f"{name.replace(' ', '_')}/{i:04d}.png"
                path = out / part / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                _render(digits.images[i], cfg.image_size, INKS[ink] if ink else None).save(path)
                rows[part].append((rel, name))
    for part, items in rows.items():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "caption"])
        for rel, name in items:
            w.writerows([rel, t.format(name)] for t in TEMPLATES)
        write_text(out / part / "captions_en.csv", buf.getvalue())
    write_split(out / "split.json", split)
    write_json(out / "world.json", {"config": asdict(cfg), "classes": classnames, "templates": list(TEMPLATES),
                                    "counts": {k: len(v) for k, v in rows.items()}})
    return out
