"""The lean server: `clipkd serve` over an index built with an exported student and text tower runs without
PyTorch; next to it, the same search served by the PyTorch stack. Three servers over the same 10,000-image gallery,
each started as `clipkd serve` in its own process and queried over loopback HTTP:

- **PyTorch**: the index built with the student's `student.pt` and the teacher spec as its text model (the whole
  CLIP is loaded for its text tower) — how a student was served before exports could be;
- **ONNX files, PyTorch stack imported**: the exported `.onnx` student and text tower, in a process that imports
  torch, Lightning and open_clip first (what serving these files loaded before the lean path: 1.2 GB a process);
- **lean**: the same `.onnx` files and nothing else (`/health` says `runtime: onnx`).

Per server: start-up (process start → `/health` answers), resident memory after start-up and its peak after the
queries (`VmRSS` / `VmHWM` from /proc; `Pss_Anon`: memory not shared with other processes), and median latency of
image queries (a 500×375 JPEG, multipart) and text queries. The teacher is open_clip's ViT-B-32 (random weights: no
download here; sizes and costs are the real architecture's), the student a resnet18 at 224 px, gallery vectors
synthetic. All ratios are measured in this one run.

    python bench_serve.py --out results/serve.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_memory import tree_rss_mb
from bench_search import _free_port, make_gallery
from common import make_jpegs, portable, report, table

PRELOAD = ("import sys, torch, lightning, open_clip; from clipkd.cli import main; "
           "sys.exit(main(sys.argv[1:]))")


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(index: Path, preload: bool, jpegs: list[bytes], texts: list[str], queries: int) -> dict:
    """Start `clipkd serve` on ``index``, time its start-up, read its memory, query it, read its peak."""
    import httpx

    port = _free_port()
    head = [sys.executable, "-c", PRELOAD] if preload else [sys.executable, "-m", "clipkd.cli"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(head + ["-q", "serve", "--index", str(index), "--port", str(port)], env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server for {index} exited with {proc.returncode}")
            try:
                health = httpx.get(url + "/health", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        startup = time.perf_counter() - t0
        after = {"rss": tree_rss_mb(proc.pid), "pss": tree_rss_mb(proc.pid, "Pss_Anon")}
        lat: dict[str, list[float]] = {"image": [], "text": []}
        with httpx.Client(timeout=60) as http:
            for i in range(queries + 3):  # 3 warm-up queries of each kind
                t = time.perf_counter()
                r = http.post(url + "/search", files={"image": ("q.jpg", jpegs[i % len(jpegs)], "image/jpeg")},
                              data={"k": "10"})
                assert r.status_code == 200 and len(r.json()["results"]) == 10, r.text
                if i >= 3:
                    lat["image"].append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                r = http.post(url + "/search", json={"text": texts[i % len(texts)], "k": 10})
                assert r.status_code == 200 and len(r.json()["results"]) == 10, r.text
                if i >= 3:
                    lat["text"].append((time.perf_counter() - t) * 1000)
        peak = _status_mb(proc.pid, "VmHWM")
        return {"runtime": health.json()["runtime"], "startup_s": startup, "rss_mb": after["rss"],
                "pss_anon_mb": after["pss"], "peak_mb": peak, "image_ms": statistics.median(lat["image"]),
                "text_ms": statistics.median(lat["text"])}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["server"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("peak_mb", "startup_s", "image_ms"),
                              ("peak resident memory (MiB)", "start-up (s)", "image query, median (ms)"), strict=True):
        ax.barh(names, [r[key] for r in rows], color=["#999999", "#6f9bd1", "#2a7f3f"])
        ax.set_title(label, fontsize=10)
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            ax.text(r[key], i, f" {r[key]:.0f}" if key != "startup_s" else f" {r[key]:.1f}", va="center",
                    fontsize=8)
        ax.margins(x=0.25)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=30, help="image and text queries per server")
    ap.add_argument("--root", default=".data/serve")
    ap.add_argument("--out", default="results/serve.md")
    a = ap.parse_args()
    import torch

    from clipkd.export import export_model
    from clipkd.students.model import Student, StudentConfig, save_student
    from clipkd.teachers import load_clip, load_text_model

    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    saved = root / "teacher.spec"  # what load_clip(...).save returned: the spec that loads the saved teacher
    if not saved.is_file():
        torch.manual_seed(0)
        saved.write_text(load_clip("open_clip:ViT-B-32@random").save(root / "teacher"))
    spec = saved.read_text()
    identity = load_text_model(spec, "cpu").identity
    student = root / "student.pt"
    if not student.is_file():
        torch.manual_seed(0)
        save_student(student, Student(StudentConfig(arch="resnet18", out_dim=512, image_size=224, teacher=identity)))
    jpegs = sorted(make_jpegs(root / "queries", 32).rglob("*.jpg"))
    files = [p.read_bytes() for p in jpegs]
    onnx_student, onnx_text = root / "student.onnx", root / "text.onnx"
    if not onnx_student.is_file():
        export_model(student, onnx_student, images=root / "queries")
    if not onnx_text.is_file():
        export_model(spec, onnx_text, tower="text")
    pt_index = make_gallery(root, a.gallery, 512, student, text_model=spec)
    onnx_index = make_gallery(root, a.gallery, 512, onnx_student, text_model=onnx_text)
    texts = ["a photo of a dog", "a red car on a street", "two people riding bicycles in the rain", "a bowl of ramen",
             "a mountain lake at sunrise", "a tabby cat on a laptop keyboard"]
    rows = []
    for name, index, preload in (("PyTorch (student.pt + CLIP spec)", pt_index, False),
                                 ("ONNX files, PyTorch stack imported", onnx_index, True),
                                 ("lean (ONNX files only)", onnx_index, False)):
        r = measure(index, preload, files, texts, a.queries)
        rows.append({"server": name, **r})
        print(rows[-1], flush=True)
    full, lean = rows[0], rows[-1]
    cols = ["server", "runtime", "start-up s", "RSS after start MiB", "Pss_Anon MiB", "peak RSS MiB", "image query ms",
            "text query ms"]
    shown = [{"server": r["server"], "runtime": r["runtime"], "start-up s": f"{r['startup_s']:.1f}",
              "RSS after start MiB": f"{r['rss_mb']:.0f}", "Pss_Anon MiB": f"{r['pss_anon_mb']:.0f}",
              "peak RSS MiB": f"{r['peak_mb']:.0f}", "image query ms": f"{r['image_ms']:.1f}",
              "text query ms": f"{r['text_ms']:.1f}"} for r in rows]
    png = plot(rows, Path(a.out).with_suffix(".png"))
    body = table(shown, cols) + (
        f"\n\nGallery {a.gallery:,} synthetic 512-d vectors (exact index); resnet18 student at 224 px, fp32; text "
        f"tower of open_clip ViT-B-32 (random weights); {a.queries} image and {a.queries} text queries per server "
        f"after 3 warm-up ones, one client. Lean / PyTorch: peak memory **{lean['peak_mb'] / full['peak_mb']:.2f}×**, "
        f"start-up **{lean['startup_s'] / full['startup_s']:.2f}×**; lean / same files with the PyTorch stack "
        f"imported: peak memory **{lean['peak_mb'] / rows[1]['peak_mb']:.2f}×**. Chart: `{png.name}`.\n")
    report(f"Lean server vs PyTorch server ({time.strftime('%Y-%m-%d')})", body, Path(a.out))
    Path(a.out).with_suffix(".json").write_text(json.dumps(portable(rows), indent=1))


if __name__ == "__main__":
    main()
