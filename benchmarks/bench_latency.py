"""Latency of teacher and student image encoders at batch 1 and 32 (eager fp32 on CPU), and of a
retrieval query: student embedding + exact top-10 search over a 100k-image gallery.

    python benchmarks/bench_latency.py [--teacher open_clip:ViT-B-32@random] [--student resnet18]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import report, table

from clipkd.students.model import Student, StudentConfig
from clipkd.teachers import load_teacher


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="open_clip:ViT-B-32@random")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--out", default="benchmarks/results/latency.md")
    a = ap.parse_args()
    teacher = load_teacher(a.teacher, device="cpu")
    student = Student(StudentConfig(arch=a.student, out_dim=teacher.embed_dim, image_size=224)).eval()
    rows = []
    for name, fn in [(f"teacher {a.teacher}", teacher.encode_image), (f"student {a.student}", student)]:
        row = {"model": name}
        for b in (1, 32):
            x = torch.randn(b, 3, 224, 224)
            ms = median_ms(lambda x=x, fn=fn: fn(x), repeats=15 if b == 1 else 3)
            row[f"batch {b} ms"] = ms
            row[f"batch {b} ms/img"] = ms / b
        rows.append(row)
    gallery = torch.nn.functional.normalize(torch.randn(a.gallery, teacher.embed_dim), dim=-1)
    x = torch.randn(1, 3, 224, 224)

    def query() -> None:
        q = torch.nn.functional.normalize(student(x), dim=-1)
        (gallery @ q[0]).topk(10)

    q_ms = median_ms(query, repeats=15)
    s_ms = median_ms(lambda: (gallery @ gallery[0]).topk(10), repeats=15)
    body = (table(rows, ["model", "batch 1 ms", "batch 32 ms", "batch 32 ms/img"])
            + f"\n\nRetrieval query (student embedding + exact top-10 over {a.gallery:,} × {teacher.embed_dim} "
            f"fp32 gallery): {q_ms:.1f} ms, of which search {s_ms:.1f} ms. "
            f"Teacher/student batch-1 ratio: {rows[0]['batch 1 ms'] / rows[1]['batch 1 ms']:.1f}×.")
    report("Latency (eager PyTorch, fp32, CPU)", body, Path(a.out))


if __name__ == "__main__":
    main()
