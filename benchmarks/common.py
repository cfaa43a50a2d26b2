"""Shared helpers for the benchmarks: a JPEG dataset, timing, machine description, Markdown tables."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 4, seed: int = 0) -> Path:
    """``n`` photo-sized JPEGs (smooth gradients, shapes and noise) in ``classes`` folders; reused if present."""
    root = Path(root)
    done = root / f".done-{n}-{size[0]}x{size[1]}"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, 3)
        grad = rng.uniform(-0.3, 0.3, (2, 3))
        arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
            d.ellipse([x0, y0, x0 + rng.integers(20, 160), y0 + rng.integers(20, 160)],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return root


REPO = Path(__file__).resolve().parent.parent


def portable(value: object) -> object:
    """``value`` (a results record) with every path under this checkout written relative to it: a results file
    names no folder of the machine that measured it."""
    if isinstance(value, str):
        return value.replace(f"{REPO}/", "")
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    return value


def machine() -> str:
    """One line naming the machine the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul throughput of this CPU, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def flops_per_image(model: torch.nn.Module, shape: Sequence[int]) -> float:
    """Forward FLOPs for one image of ``shape`` (C, H, W), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, *shape))
    return float(fc.get_total_flops())


def table(rows: list[dict[str, object]], cols: Sequence[str]) -> str:
    """A Markdown table of ``rows`` with ``cols``."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def report(title: str, body: str, out: Path | None = None) -> str:
    """Print (and optionally write) a benchmark's Markdown report with the machine line."""
    text = f"### {title}\n\nMachine: {machine()}\n\n{body}\n"
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text
