"""Teacher embedding throughput: a seed-style loop vs ``clipkd embed-images`` vs the forward pass alone.

(a) seed style: batch 1, 8 loader workers, full-size decode, one ``.npy`` per image (as NVIDIA
clip-distillation's ``compute_openclip_embeddings.py``); (b) ``clipkd.store.embed_images`` at its
defaults; (c) the teacher's image forward on in-memory tensors at (b)'s batch size — the ceiling.
The FLOP limit is this CPU's fp32 matmul peak divided by the model's FLOPs per image.

    python benchmarks/bench_embed.py [--images 256] [--teacher open_clip:ViT-B-32@random]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import flops_per_image, make_jpegs, matmul_peak_gflops, report, table, timed
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipkd.data.folders import list_images
from clipkd.store import embed_images
from clipkd.teachers import load_teacher


class SeedStyle(Dataset):
    def __init__(self, root: Path, paths: list[str], preprocess) -> None:
        self.root, self.paths, self.preprocess = root, paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.preprocess(Image.open(self.root / self.paths[i]).convert("RGB")), i


def seed_loop(teacher, root: Path, out: Path) -> None:
    paths = list_images(root)
    loader = DataLoader(SeedStyle(root, paths, teacher.preprocess), batch_size=1, num_workers=8)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for x, i in loader:
            emb = teacher.model.encode_image(x)
            np.save(out / (Path(paths[int(i)]).stem + ".npy"), emb[0].numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024, help="enough that worker start-up (~2 s) is a small share")
    ap.add_argument("--teacher", default="open_clip:ViT-B-32@random")
    ap.add_argument("--data", default="benchmarks/.data/jpegs", help="where the generated JPEGs are kept")
    ap.add_argument("--out", default="benchmarks/results/embed.md")
    a = ap.parse_args()
    root = make_jpegs(Path(a.data) / f"n{a.images}", a.images)
    teacher = load_teacher(a.teacher, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="clipkd-bench-"))
    try:
        n = a.images
        t_seed = timed(lambda: seed_loop(teacher, root, tmp / "seed"))
        t_ours = timed(lambda: embed_images(teacher, root, tmp / "store", progress=False))
        size = teacher.preprocess_cfg.get("size") or [224, 224]
        size = size if isinstance(size, list) else [size, size]
        x = torch.randn(64, 3, *size)
        teacher.encode_image(x[:8])  # warm-up
        reps = max(1, n // 64)
        t_fwd = timed(lambda: [teacher.encode_image(x) for _ in range(reps)]) / (reps * 64) * n
        # --compile: compile once (timed apart: a one-off cost), then the same two measurements
        # (under inference_mode, as embed-images runs it: dynamo guards on the autograd mode)
        teacher.compile_image_tower(64)
        with torch.inference_mode():
            t_compile = timed(lambda: teacher.encode_image(x))
            compiled = teacher._compiled is not None
            t_ours_c = timed(lambda: embed_images(teacher, root, tmp / "store_c", progress=False, compile=True))
            t_fwd_c = timed(lambda: [teacher.encode_image(x) for _ in range(reps)]) / (reps * 64) * n
        gflop = flops_per_image(teacher.model.visual, (3, *size)) / 1e9
        peak = matmul_peak_gflops()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {"variant": "(a) seed-style loop (batch 1, 8 workers, .npy per image)", "img/s": n / t_seed,
         "vs (a)": 1.0, "vs (c)": t_fwd / t_seed},
        {"variant": "(b) clipkd embed-images (defaults)", "img/s": n / t_ours, "vs (a)": t_seed / t_ours,
         "vs (c)": t_fwd / t_ours},
        {"variant": "(c) forward alone, batch 64, in memory", "img/s": n / t_fwd, "vs (a)": t_seed / t_fwd,
         "vs (c)": 1.0},
        {"variant": "(b') clipkd embed-images --compile", "img/s": n / t_ours_c, "vs (a)": t_seed / t_ours_c,
         "vs (c)": t_fwd / t_ours_c},
        {"variant": "(c') forward alone, torch.compile", "img/s": n / t_fwd_c, "vs (a)": t_seed / t_fwd_c,
         "vs (c)": t_fwd / t_fwd_c},
        {"variant": f"FLOP limit ({peak:.0f} GFLOP/s ÷ {gflop:.2f} GFLOP/img)", "img/s": peak / gflop,
         "vs (a)": (peak / gflop) / (n / t_seed), "vs (c)": (peak / gflop) / (n / t_fwd)},
    ]
    body = (f"Teacher `{a.teacher}`, {n} JPEGs of 500×375, fp32 on CPU.\n\n"
            + table(rows, ["variant", "img/s", "vs (a)", "vs (c)"])
            + f"\n\n(c) reaches {100 * (n / t_fwd) / (peak / gflop):.0f}% of the FLOP limit. "
            + (f"Compiling took {t_compile:.0f} s once (not in the rows above)." if compiled
               else "torch.compile fell back to eager on this machine (see the warning above)."))
    report("Teacher embedding throughput", body, Path(a.out))


if __name__ == "__main__":
    main()
