"""Search benchmark: a 100,000-image gallery behind `clipkd serve`, queried with real JPEGs through a resnet18
student at 224 px, over loopback HTTP.

- end-to-end latency p50 / p99 (upload + decode + student forward + FAISS + JSON), one client and 16 concurrent
  clients (an async httpx loop), queries/s, failed requests; with dynamic batching on and off;
- exact vs approximate FAISS indexes on the same gallery: search time per query and recall@10.

Gallery vectors are synthetic (clustered unit vectors; the index does not care where they came from); queries
are real JPEG files through the real model. All ratios are measured in this one run.

    python bench_search.py --gallery 100000 --out results/search.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import machine, make_jpegs, report, table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_student(root: Path) -> Path:
    """The benchmarks' search student: a resnet18 at 224 px with random weights (the real architecture's cost)."""
    import torch

    from clipkd.students.model import Student, StudentConfig, save_student

    student = root / "student.pt"
    if not student.is_file():
        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_student(student, Student(StudentConfig(arch="resnet18", out_dim=512, image_size=224)))
    return student


def make_gallery(root: Path, n: int, dim: int, student: Path, text_model: str | Path | None = None) -> Path:
    """An index folder whose store holds ``n`` synthetic unit vectors attributed to ``student`` (``text_model``: its
    teacher's text tower, for text queries)."""
    from clipkd.search.encoder import load_encoder
    from clipkd.search.writers import index_store
    from clipkd.store import EmbeddingStore, ShardWriter, new_manifest

    out = root / f"gallery-{n}-{Path(student).name.replace('.', '-')}"
    if (out / "index.json").is_file():
        return out
    enc = load_encoder(student, device="cpu")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, dim))
    writer = ShardWriter(out / "store", new_manifest(enc.describe(), out / "gallery", 8192, out / "store"), 8192)
    (out / "store").mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 8192):
        m = min(8192, n - start)
        v = centers[rng.integers(0, 1000, m)] + 0.5 * rng.normal(size=(m, dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        writer.add(v.astype(np.float16), [f"{i:07d}.jpg" for i in range(start, start + m)], [0] * m)
    writer.flush()
    assert len(EmbeddingStore(out / "store")) == n
    link_placeholders(out / "gallery", EmbeddingStore(out / "store").paths)
    index_store(out, student, kind="auto", text_model=text_model, device="cpu")  # the kind `index build` would choose
    return out


def link_placeholders(root: Path, keys: list[str]) -> None:
    """A file for every synthetic row (hard links to one small JPEG), so the index serves as a real one does: a
    server refuses a collection whose images are not there."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(keys):
        one = root / f".placeholder-{i // 60_000}.jpg"  # a file system allows some 65,000 links to one file
        if not one.is_file():
            Image.new("RGB", (8, 8), (128, 128, 128)).save(one)
        if not (root / k).exists():
            os.link(one, root / k)


async def _load(url: str, files: list[bytes], clients: int, per_client: int) -> dict:
    import httpx

    lat: list[float] = []
    failed = 0

    async def client(c: int) -> None:
        nonlocal failed
        async with httpx.AsyncClient(timeout=60) as http:
            for i in range(per_client):
                data = files[(c * per_client + i) % len(files)]
                t = time.perf_counter()
                r = await http.post(url + "/search", files={"image": ("q.jpg", data, "image/jpeg")},
                                    data={"k": "10"})
                if r.status_code != 200 or len(r.json()["results"]) != 10:
                    failed += 1
                lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in lat)
    return {"p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "qps": len(ms) / wall,
            "failed": failed, "n": len(ms)}


def wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"clipkd serve exited with {proc.returncode} before serving")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("clipkd serve did not answer within two minutes")


def serve_and_load(index: Path, files: list[bytes], batch: bool, single: int, concurrent: int) -> dict:

    port = _free_port()
    cmd = [sys.executable, "-m", "clipkd.cli", "-q", "serve", "--index", str(index), "--port", str(port)]
    proc = subprocess.Popen(cmd + ([] if batch else ["--no-batch"]), env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc)
        asyncio.run(_load(url, files, 1, 10))  # warm-up
        one = asyncio.run(_load(url, files, 1, single))
        many = asyncio.run(_load(url, files, 16, concurrent))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"one": one, "many": many}


def compare_indexes(index: Path, queries: int = 1000) -> list[dict]:
    from clipkd.search.planning import make_faiss, recall_at_10
    from clipkd.store import EmbeddingStore

    v = np.ascontiguousarray(EmbeddingStore(index / "store").embeddings(), dtype=np.float32)
    q = v[np.random.default_rng(1).choice(len(v), queries, replace=False)]
    rows = []
    for kind in ("flat", "hnsw", "ivf", "ivfpq"):
        t = time.perf_counter()
        idx, params = make_faiss(v, kind)
        build = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(queries):
            idx.search(q[i : i + 1], 10)
        per_query = (time.perf_counter() - t) / queries * 1000
        rows.append({"index": kind, "params": ", ".join(f"{k}={p}" for k, p in params.items()) or "-",
                     "build s": f"{build:.1f}", "search ms/query": f"{per_query:.2f}",
                     "recall@10 vs exact": f"{recall_at_10(idx, v, queries=queries):.3f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--single", type=int, default=100, help="queries of the one-client run")
    ap.add_argument("--concurrent", type=int, default=25, help="queries per client of the 16-client run")
    ap.add_argument("--root", default=".data/search")
    ap.add_argument("--out", default="results/search.md")
    a = ap.parse_args()
    root = Path(a.root)
    student = bench_student(root)
    index = make_gallery(root, a.gallery, 512, student)
    jpegs = sorted(make_jpegs(root / "queries", 64).rglob("*.jpg"))
    files = [p.read_bytes() for p in jpegs]
    exported = root / "student-int8.onnx"  # the deployed student: ONNX Runtime, INT8 (static PTQ on the queries)
    if not exported.is_file():
        from clipkd.export import export_model

        export_model(student, exported, images=root / "queries", int8=True, calib=root / "queries")
    rows = []
    for model, idx, batch in (("PyTorch fp32", index, True), ("PyTorch fp32", index, False),
                              ("ONNX INT8", make_gallery(root, a.gallery, 512, exported), True)):
        r = serve_and_load(idx, files, batch, a.single, a.concurrent)
        for name, m in (("1 client", r["one"]), ("16 clients", r["many"])):
            rows.append({"student": model, "service": "batched" if batch else "one forward per query", "load": name,
                         "p50 ms": f"{m['p50']:.1f}", "p99 ms": f"{m['p99']:.1f}", "queries/s": f"{m['qps']:.1f}",
                         "failed": f"{m['failed']} / {m['n']}"})
        if model == "ONNX INT8":
            onnx_ratio = r["many"]["qps"] / r["one"]["qps"]
        elif batch:
            ratio, batched = r["many"]["qps"] / r["one"]["qps"], r["many"]["qps"]
        else:
            single = r["many"]["qps"]
        print(rows[-2:], flush=True)
    body = table(rows, ["student", "service", "load", "p50 ms", "p99 ms", "queries/s", "failed"])
    kind = json.loads((index / "index.json").read_text())["kind"]
    body += (f"\n\nGallery {a.gallery:,} images ({kind} index, as `index build` chooses it), resnet18 student at "
             f"224 px, real JPEG queries (500×375) uploaded over loopback HTTP; k = 10. Throughput with 16 clients / "
             f"one client (batched service): **{ratio:.2f}×**; batched / one forward per query, 16 clients: "
             f"**{batched / single:.2f}×**; the exported INT8 student, 16 clients / one client: "
             f"**{onnx_ratio:.2f}×**.\n\n")
    body += table(compare_indexes(index), ["index", "params", "build s", "search ms/query", "recall@10 vs exact"])
    body += f"\n\nOne query at a time over the same {a.gallery:,} vectors (512-d); recall@10 against exact search.\n"
    report(f"Search service ({machine()})", body, Path(a.out))


if __name__ == "__main__":
    main()
