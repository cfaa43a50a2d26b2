"""Distillation training throughput: a seed-style loop vs ``clipkd distill`` vs the train step alone.

(a) seed style: per-image ``.npy`` targets read in the dataset, 8 loader workers, a plain PyTorch
loop (as ``distil_model_embeddings.py``); (b) ``clipkd.training.distill.distill`` with a store, at
its defaults, steady-state images/s as its run logs it; (c) the same student's forward + backward +
AdamW step on in-memory tensors — the ceiling. All three exclude their first step (start-up).

    python benchmarks/bench_distill.py [--images 512] [--student resnet18]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from common import make_jpegs, report, table
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipkd.data.folders import list_images
from clipkd.store import embed_images
from clipkd.students.model import StudentConfig, student_transform
from clipkd.teachers import load_teacher
from clipkd.training.distill import TrainConfig, distill

DIM, BATCH, SIZE = 128, 64, 224


class SeedStyle(Dataset):
    def __init__(self, root: Path, paths: list[str], targets: Path, transform) -> None:
        self.root, self.paths, self.targets, self.transform = root, paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = self.transform(Image.open(self.root / self.paths[i]).convert("RGB"))
        return img, torch.from_numpy(np.load(self.targets / f"{Path(self.paths[i]).stem}.npy"))


def steady_rate(step_times: list[float], batch: int) -> float:
    """Images/s over all steps but the first."""
    return batch * (len(step_times) - 1) / sum(step_times[1:])


def train_steps(model, batches) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times, t = [], time.perf_counter()
    for x, y in batches:
        loss = F.mse_loss(F.normalize(model(x), dim=-1), F.normalize(y, dim=-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--data", default="benchmarks/.data/jpegs")
    ap.add_argument("--out", default="benchmarks/results/distill.md")
    a = ap.parse_args()
    root = make_jpegs(Path(a.data) / f"n{a.images}", a.images)
    paths = list_images(root)
    tmp = Path(tempfile.mkdtemp(prefix="clipkd-bench-"))
    try:
        # targets: a cheap stand-in teacher (compute here does not depend on target values)
        store = embed_images(load_teacher("open_clip:clipkd-tiny@random", device="cpu"), root, tmp / "store",
                             progress=False)
        emb = store.embeddings()
        (tmp / "npy").mkdir()
        for p, row in zip(paths, store.rows(paths), strict=True):
            np.save(tmp / "npy" / f"{Path(p).stem}.npy", np.asarray(emb[row], dtype=np.float32))
        cfg = StudentConfig(arch=a.student, out_dim=DIM, image_size=SIZE)
        tf = student_transform(cfg, "flip")

        torch.manual_seed(0)
        model = timm.create_model(a.student, num_classes=DIM)
        seed_loader = DataLoader(SeedStyle(root, paths, tmp / "npy", tf), batch_size=BATCH, shuffle=True,
                                 num_workers=8, drop_last=True)
        r_seed = steady_rate(train_steps(model, seed_loader), BATCH)

        recipe = TrainConfig(student=a.student, epochs=1, batch_size=BATCH, image_size=SIZE, augment="flip")
        distill(root, tmp / "run", recipe, store=tmp / "store", device="cpu", progress=False)
        with (tmp / "run" / "logs" / "metrics.csv").open() as f:
            r_ours = float([r for r in csv.DictReader(f) if r.get("img_per_s")][-1]["img_per_s"])

        x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randn(BATCH, DIM)
        model = timm.create_model(a.student, num_classes=DIM)
        r_step = steady_rate(train_steps(model, [(x, y)] * max(3, a.images // BATCH)), BATCH)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {"variant": "(a) seed-style loop (.npy targets, 8 workers)", "img/s": r_seed, "vs (c)": r_seed / r_step},
        {"variant": "(b) clipkd distill (store targets, defaults)", "img/s": r_ours, "vs (c)": r_ours / r_step,
         "vs (a)": r_ours / r_seed},
        {"variant": "(c) train step alone, in memory", "img/s": r_step, "vs (c)": 1.0},
    ]
    body = (f"Student `{a.student}` @{SIZE}, batch {BATCH}, {a.images} JPEGs of 500×375, flip augmentation, "
            "fp32 on CPU.\n\n" + table(rows, ["variant", "img/s", "vs (c)", "vs (a)"]))
    report("Distillation training throughput", body, Path(a.out))


if __name__ == "__main__":
    main()
