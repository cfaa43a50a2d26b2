"""Peak memory of ``clipkd embed-images`` and of ``clipkd distill --store`` on 20k vs 200k images: the store
streams shards to disk, and training reads each image's target row from the memory-mapped shards when the loader
asks for it, so the peak resident memory (process and loader workers together) must stay flat as the collection
grows. The distillation store is synthetic (random 512-d rows, a ViT-B/32 teacher's size, keyed by the real
images), so the targets a trainer would otherwise hold (N × 512 fp16: 205 MB at 200k) are visible.

    python benchmarks/bench_memory.py [--small 20000] [--large 200000]
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


def tree_rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Memory of a process and all its descendants, MiB (from /proc). ``VmRSS``: everything resident, file-backed
    pages of memory-mapped files included (page cache the kernel can drop); ``RssAnon``: the anonymous memory each
    process maps, so a page a forked loader worker still shares with its parent counts once per process;
    ``Pss_Anon`` (from ``smaps_rollup``): the same pages, each split among the processes sharing it — what the
    job really holds."""
    name = "smaps_rollup" if field.startswith("Pss") else "status"
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/{name}").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


FIELDS = ("VmRSS", "RssAnon", "Pss_Anon")


def peak_rss(cmd: list[str]) -> tuple[dict[str, float], float]:
    """Peak tree memory (MiB, sampled every 20 ms) for each of :data:`FIELDS`, and wall seconds of a command."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: progress bars would fill a pipe and stall the child
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        peak = dict.fromkeys(FIELDS, 0.0)
        while proc.poll() is None:
            for f in FIELDS:
                peak[f] = max(peak[f], tree_rss_mb(proc.pid, f))
            time.sleep(0.02)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-2000:]}")
    return peak, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--large", type=int, default=200000)
    ap.add_argument("--teacher", default="open_clip:clipkd-tiny@random")
    ap.add_argument("--data", default="benchmarks/.data/small-jpegs")
    ap.add_argument("--out", default="benchmarks/results/memory.md")
    a = ap.parse_args()
    clipkd = str(Path(sys.executable).with_name("clipkd"))
    tmp = Path(tempfile.mkdtemp(prefix="clipkd-bench-"))
    rows = []
    cols = {"VmRSS": "peak RSS MiB", "RssAnon": "peak anonymous MiB (per process)",
            "Pss_Anon": "peak anonymous MiB (shared pages split)"}
    try:
        for n in (a.small, a.large):
            root = make_jpegs(Path(a.data) / f"n{n}", n, size=(96, 72))
            peak, secs = peak_rss([clipkd, "embed-images", "--teacher", a.teacher, "--images", str(root),
                                   "--out", str(tmp / f"store{n}"), "--device", "cpu"])
            rows.append({"command": "embed-images", "images": n, **{cols[f]: peak[f] for f in FIELDS},
                         "seconds": secs})
            store = synthetic_store(root, tmp / f"store512-{n}")
            peak, secs = peak_rss([clipkd, "distill", "--store", str(store), "--images", str(root), "--out",
                                   str(tmp / f"run{n}"), "--student", "resnet10t", "--image-size", "32",
                                   "--epochs", "1", "--batch-size", "256", "--device", "cpu"])
            rows.append({"command": "distill --store (512-d)", "images": n, **{cols[f]: peak[f] for f in FIELDS},
                         "seconds": secs})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = []
    for cmd in ("embed-images", "distill --store (512-d)"):
        growth = []
        for f in FIELDS:
            small, large = (r[cols[f]] for r in rows if r["command"] == cmd)
            growth.append(f"{cols[f].removeprefix('peak ').removesuffix(' MiB')} {100 * (large / small - 1):+.1f}% "
                          f"({large - small:+,.0f} MiB)")
        lines.append(f"- `{cmd}` from {a.small:,} to {a.large:,} images: " + "; ".join(growth))
    body = (f"Teacher `{a.teacher}` for embed-images (default shard size 8192), 96×72 JPEGs; distill: resnet10t at "
            "32 px, 1 epoch, batch 256, default loader workers, from a synthetic 512-d store of the same images. "
            "Memory of the process and its loader workers together.\n\n"
            + table(rows, ["command", "images", *cols.values(), "seconds"]) + "\n\n" + "\n".join(lines)
            + "\n\nRSS counts the pages of memory-mapped store shards a process has read (page cache the kernel "
              "can drop under pressure). Anonymous memory is what the processes allocated: summed per process, a "
              "page a loader worker still shares with the parent it was forked from counts once in each; with "
              "shared pages split among their sharers (PSS), each counts once.")
    report("Memory of embed-images and distill", body, Path(a.out))


def synthetic_store(root: Path, out: Path, dim: int = 512) -> Path:
    """A store of random unit rows for every image under ``root`` (written in shards like a real one)."""
    import numpy as np

    from clipkd.data.folders import list_images
    from clipkd.data.preprocess import PreprocessConfig
    from clipkd.store import ShardWriter, new_manifest

    files = list_images(root)
    info = {"teacher": f"synthetic:random-{dim}", "embed_dim": dim, "preprocess": PreprocessConfig().to_dict()}
    writer = ShardWriter(out, new_manifest(info, root, 8192, out), 8192)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(files), 8192):
        part = files[i:i + 8192]
        v = rng.standard_normal((len(part), dim)).astype(np.float32)
        writer.add(v / np.linalg.norm(v, axis=1, keepdims=True), part, [(root / f).stat().st_size for f in part])
    writer.flush(final=True)
    return out

if __name__ == "__main__":
    main()
