"""Peak memory of ``clipkd embed-images`` on 1k vs 20k images: the store streams shards to disk, so
the peak resident memory (process and loader workers together) must not grow with the image count.

    python benchmarks/bench_memory.py [--small 1000] [--large 20000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import make_jpegs, report, table


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """Peak tree RSS (MiB, sampled every 20 ms) and wall seconds of a command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return peak, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--teacher", default="open_clip:clipkd-tiny@random")
    ap.add_argument("--data", default="benchmarks/.data/small-jpegs")
    ap.add_argument("--out", default="benchmarks/results/memory.md")
    a = ap.parse_args()
    clipkd = str(Path(sys.executable).with_name("clipkd"))
    tmp = Path(tempfile.mkdtemp(prefix="clipkd-bench-"))
    rows = []
    try:
        for n in (a.small, a.large):
            root = make_jpegs(Path(a.data) / f"n{n}", n, size=(96, 72))
            peak, secs = peak_rss([clipkd, "embed-images", "--teacher", a.teacher, "--images", str(root),
                                   "--out", str(tmp / f"store{n}"), "--device", "cpu"])
            rows.append({"images": n, "peak RSS MiB (process + workers)": peak, "seconds": secs})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = rows[1]["peak RSS MiB (process + workers)"] / rows[0]["peak RSS MiB (process + workers)"] - 1
    body = (f"Teacher `{a.teacher}`, 96×72 JPEGs, default shard size 8192.\n\n"
            + table(rows, ["images", "peak RSS MiB (process + workers)", "seconds"])
            + f"\n\nPeak memory change from {a.small} to {a.large} images: {100 * growth:+.1f}%.")
    report("Memory of embed-images", body, Path(a.out))


if __name__ == "__main__":
    main()
