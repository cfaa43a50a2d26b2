"""The demo world: a seeded, compositional world of coloured shapes ("red circle", "blue star", ...).

Every colour and every shape occurs among the *seen* classes; the *unseen* classes are new
combinations of them, which is what a zero-shot student has to get right.
"""

from __future__ import annotations

import csv
import io
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ..errors import ClipkdError, check_fields
from ..fileio import atomic_write, read_json, write_json
from .splits import Split, write_split

COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 30, 30), "红色"),
    "orange": ((245, 140, 20), "橙色"),
    "yellow": ((235, 220, 40), "黄色"),
    "green": ((40, 170, 60), "绿色"),
    "cyan": ((40, 205, 215), "青色"),
    "blue": ((40, 70, 225), "蓝色"),
    "purple": ((140, 50, 190), "紫色"),
    "pink": ((245, 135, 195), "粉色"),
    "white": ((245, 245, 245), "白色"),
    "brown": ((130, 80, 35), "棕色"),
}
SHAPES: dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "星形",
    "cross": "十字",
    "ring": "圆环",
    "crescent": "月牙",
    "diamond": "菱形",
    "hexagon": "六边形",
    "arrow": "箭头",
}
SPLITS = ("train", "val", "test")
EN_TEMPLATES = (
    "a photo of a {c} {s}.",
    "a {size} {c} {s}.",
    "a {c} {s} on a {bg} background.",
    "a {s} that is {c}.",
    "a picture showing one {c} {s}.",
    "there is a {c} {s} in the {pos} of the image.",
)
ZH_TEMPLATES = (
    "一张{c}{s}的照片。",
    "一个{size}的{c}{s}。",
    "{bg}背景上的一个{c}{s}。",
    "这个{s}是{c}的。",
    "图片的{pos}有一个{c}{s}。",
)
WORLD_FORMAT = "clipkd-world/1"


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a demo world; equal configs give byte-identical worlds."""

    seed: int = 0
    n_shapes: int = 8
    n_colours: int = 8
    image_size: int = 32
    train_per_class: int = 100
    val_per_class: int = 10
    test_per_class: int = 30
    unseen_per_shape: int = 2
    captions_per_image: int = 3


def class_folder(colour: str, shape: str) -> str:
    """Folder name of a class; :func:`clipkd.data.folders.clean_classname` turns it back into "red circle"."""
    return f"{colour}_{shape}"


def choose_split(cfg: WorldConfig) -> Split:
    """Mark ``unseen_per_shape`` colours of every shape unseen, in a Latin-square pattern.

    Each shape keeps ``n_colours - unseen_per_shape`` seen colours, and each colour stays seen in
    at least one shape, so every attribute is taught and only the combinations are new.
    """
    colours, shapes = list(COLOURS)[: cfg.n_colours], list(SHAPES)[: cfg.n_shapes]
    k = cfg.unseen_per_shape
    if not 0 < k < cfg.n_colours:
        raise ClipkdError(f"unseen_per_shape must be in 1..{cfg.n_colours - 1}, got {k}")
    rng = np.random.default_rng(cfg.seed)
    cperm, sperm = rng.permutation(len(colours)), rng.permutation(len(shapes))
    offsets = {round(j * cfg.n_colours / k) for j in range(k)} if k > 1 else {0}
    seen, unseen = [], []
    for si, s in enumerate(shapes):
        for ci, c in enumerate(colours):
            name = f"{c} {s}"
            is_unseen = (int(cperm[ci]) - int(sperm[si])) % cfg.n_colours in offsets
            (unseen if is_unseen else seen).append(name)
    for attr in colours + shapes:
        if not any(attr in name.split() for name in seen):
            raise ClipkdError(f"split leaves '{attr}' without any seen class; lower unseen_per_shape")
    return Split(seen=seen, unseen=unseen)


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    """Draw ``shape`` as an anti-aliased mask at 4x supersampling, randomly scaled, rotated and placed."""
    ss = size * 4
    scale = rng.uniform(0.38, 0.7) * ss / 2
    angle = rng.uniform(0, 2 * math.pi)
    cx = rng.uniform(scale * 0.9, ss - scale * 0.9)
    cy = rng.uniform(scale * 0.9, ss - scale * 0.9)
    mask = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(mask)

    def poly(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in points]

    def regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]

    def disc(x: float, y: float, r: float, fill: int) -> None:
        px, py = poly([(x, y)])[0]
        draw.ellipse([px - r * scale, py - r * scale, px + r * scale, py + r * scale], fill=fill)

    if shape == "circle":
        disc(0, 0, 0.9, 255)
    elif shape == "ring":
        disc(0, 0, 1.0, 255)
        disc(0, 0, 0.55, 0)
    elif shape == "crescent":
        disc(0, 0, 1.0, 255)
        disc(0.45, 0, 0.8, 0)
    elif shape == "square":
        draw.polygon(poly(regular(4, 1.0, math.pi / 4)), fill=255)
    elif shape == "diamond":
        draw.polygon(poly([(0, -1.05), (0.55, 0), (0, 1.05), (-0.55, 0)]), fill=255)
    elif shape == "triangle":
        draw.polygon(poly(regular(3, 1.05, -math.pi / 2)), fill=255)
    elif shape == "hexagon":
        draw.polygon(poly(regular(6, 0.95)), fill=255)
    elif shape == "star":
        outer, inner = regular(5, 1.05, -math.pi / 2), regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        draw.polygon(poly([p for pair in zip(outer, inner, strict=True) for p in pair]), fill=255)
    elif shape == "cross":
        a, b = 0.33, 1.0
        draw.polygon(poly([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                           (-b, a), (-b, -a), (-a, -a)]), fill=255)
    elif shape == "arrow":
        draw.polygon(poly([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25),
                           (-1, 0.25)]), fill=255)
    else:
        raise ClipkdError(f"unknown shape '{shape}'")
    return mask.resize((size, size), Image.Resampling.LANCZOS), (cx / ss, cy / ss, scale * 2 / ss)


def render(colour: str, shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Render one image of a ``colour`` ``shape``; also return the words its captions use."""
    base = rng.uniform(25, 115)
    grad = rng.uniform(-35, 35, size=2)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    bg = base + grad[0] * xx + grad[1] * yy
    tint = rng.uniform(-8, 8, size=3)
    background = np.clip(bg[..., None] + tint, 0, 255)
    mask, (cx, cy, extent) = _shape_mask(shape, size, rng)
    rgb = np.clip(np.array(COLOURS[colour][0], dtype=np.float64) + rng.uniform(-18, 18, size=3), 0, 255)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    img = background * (1 - alpha) + rgb * alpha
    img = np.clip(img + rng.normal(0, 6, size=img.shape), 0, 255).astype(np.uint8)
    out = Image.fromarray(img, "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.6)))
    words = {
        "size": "small" if extent < 0.5 else "large",
        "bg": "dark" if base < 70 else "grey",
        "pos": ("top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle")
        + ("" if 0.4 <= cx <= 0.6 else " left" if cx < 0.4 else " right"),
    }
    return out, words


_ZH_WORDS = {"small": "小", "large": "大", "dark": "深色", "grey": "灰色", "top": "上方", "bottom": "下方",
             "middle": "中间", "left": "左", "right": "右"}


def captions_for(colour: str, shape: str, words: dict, n: int, rng: np.random.Generator) -> tuple[list, list]:
    """Pick ``n`` English and ``n`` Chinese captions for one image."""
    en_idx = rng.choice(len(EN_TEMPLATES), size=min(n, len(EN_TEMPLATES)), replace=False)
    zh_idx = rng.choice(len(ZH_TEMPLATES), size=min(n, len(ZH_TEMPLATES)), replace=False)
    en = [EN_TEMPLATES[i].format(c=colour, s=shape, **words) for i in en_idx]
    zh_words = {k: "".join(_ZH_WORDS[w] for w in v.split()) for k, v in words.items()}
    zh = [ZH_TEMPLATES[i].format(c=COLOURS[colour][1], s=SHAPES[shape], **zh_words) for i in zh_idx]
    return en, zh


def _render_class(args: tuple) -> list[tuple[str, list[str], list[str]]]:
    """Worker: render every image of one class in one split; return (relpath, en captions, zh captions)."""
    out, cfg, split_i, class_i, colour, shape, count = args
    rows = []
    folder = Path(out) / SPLITS[split_i] / class_folder(colour, shape)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([cfg.seed, split_i, class_i, i])
        img, words = render(colour, shape, cfg.image_size, rng)
        rel = f"{SPLITS[split_i]}/{class_folder(colour, shape)}/{i:05d}.png"
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write(Path(out) / rel, lambda f, b=buf: f.write(b.getvalue()))
        en, zh = captions_for(colour, shape, words, cfg.captions_per_image, rng)
        rows.append((rel, en, zh))
    return rows


def synthesize(out: str | Path, cfg: WorldConfig = WorldConfig(), workers: int = 2) -> Path:
    """Write the demo world to ``out`` (ImageFolder splits, captions, split file); reuse it if complete.

    Layout: ``train/ val/ test/`` (one folder per class, plus ``captions_en.csv`` and
    ``captions_zh.csv``: ``path,caption``, one row per caption, paths relative to the split
    folder), ``split.json`` and
    ``world.json`` (the config; written last, so its presence means the world is complete).
    """
    out = Path(out)
    check_fields(cfg)
    if cfg.n_colours > len(COLOURS) or cfg.n_shapes > len(SHAPES):
        raise ClipkdError(f"at most {len(COLOURS)} colours and {len(SHAPES)} shapes are available")
    marker = out / "world.json"
    if marker.is_file() and read_json(marker, "world file") .get("config") == asdict(cfg) \
            and read_json(marker, "world file").get("format") == WORLD_FORMAT:
        return out
    split = choose_split(cfg)
    colours, shapes = list(COLOURS)[: cfg.n_colours], list(SHAPES)[: cfg.n_shapes]
    classes = [(c, s) for s in shapes for c in colours]
    counts = (cfg.train_per_class, cfg.val_per_class, cfg.test_per_class)
    jobs = [(str(out), cfg, si, ci, c, s, counts[si]) for si in range(3) for ci, (c, s) in enumerate(classes)]
    rows: list = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for part in tqdm(pool.map(_render_class, jobs, chunksize=4), total=len(jobs), desc="synth", unit="class"):
            rows.extend(part)
    for split_name in SPLITS:
        prefix = f"{split_name}/"
        split_rows = [(r[0][len(prefix):], r[1], r[2]) for r in rows if r[0].startswith(prefix)]
        for lang, col in (("en", 1), ("zh", 2)):
            def write(f, col=col, split_rows=split_rows):
                w = csv.writer(f)
                w.writerow(["path", "caption"])
                for r in split_rows:
                    for cap in r[col]:
                        w.writerow([r[0], cap])

            atomic_write(out / split_name / f"captions_{lang}.csv", write, mode="w")
    write_split(out / "split.json", split)
    classes_meta = [{"name": f"{c} {s}", "folder": class_folder(c, s), "colour": c, "shape": s,
                     "zh": f"{COLOURS[c][1]}{SHAPES[s]}"} for c, s in classes]
    write_json(marker, {"format": WORLD_FORMAT, "config": asdict(cfg), "classes": classes_meta})
    return out
