"""Search at scale: clipkd's index on millions of rows on one machine, next to autofaiss (clip-retrieval's builder)
at the same memory budget.

Per row count (1M and 10M by default): a store of synthetic clustered 512-d unit vectors (a few thousand Gaussian
clusters, fp16 shards on disk, as `embed-images` writes them), 1,000 held-out queries from the same clusters and
their exact top-10 (computed once, a chunk at a time). Then, each in its own process:

- **build**: `index_store` under `--max-memory` (the kind `auto` chooses for the budget): seconds and peak RSS;
- **serve**: `clipkd serve` on it: seconds until `/health` answers, p50/p99 of single queries by embedding over HTTP
  (`/knn-service`, `embedding_input`: the index is measured, not the encoder) at 1 and 16 clients, recall@10 of its
  answers against exact, and its resident memory after the queries;
- **add**: 100,000 more rows appended to the served index (`append_store`, no rebuild), in seconds; then rolled back
  (the store's manifest and the index's generation restored) so that the benchmark can be run again;
- **autofaiss**: `autofaiss build_index` on the same shards with `max_index_memory_usage` = the same budget, in its
  own environment (`benchmarks/.venv-autofaiss`: autofaiss pins numpy < 2); its index opened memory-mapped and
  queried in-process (no HTTP: the index alone) with the parameters autofaiss chose.

Writes `results/search-scale.md`, `.json` (one object per run) and `.png`.

    cd benchmarks && ../.venv/bin/python bench_search_scale.py --rows 1000000 10000000 --out results/search-scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from bench_memory import tree_rss_mb
from bench_search import _free_port, bench_student, wait_until_serving
from common import machine, portable, report, table

HERE = Path(__file__).resolve().parent
SHARD = 65_536
PER_DIR = 10_000  # placeholder files per folder


def _key(i: int) -> str:
    return f"{i // PER_DIR:05d}/{i:08d}.jpg"


SPREAD = 0.5  # the noise's norm next to a cluster centre's 1: a row's cosine to its centre is about 0.89


def _vectors(centers: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = centers[rng.integers(0, len(centers), n)]
    v += SPREAD * rng.standard_normal(v.shape, dtype=np.float32) / np.sqrt(v.shape[1])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


LEAN = HERE.parent / ".venv-lean" / "bin" / "python"  # `pip install clipkd[serve]`: the server without PyTorch


def onnx_student(root: Path) -> Path:
    """The benchmarks' search student exported to ONNX: what the lean server (no PyTorch) runs."""
    from common import make_jpegs

    from clipkd.export import export_model

    onnx = root / "student.onnx"
    if not onnx.is_file():
        export_model(bench_student(root), onnx, images=make_jpegs(root / "queries", 4))
    return onnx


def make_world(root: Path, n: int, dim: int, clusters: int, student: Path, queries: int) -> Path:
    """An index folder whose store holds ``n`` synthetic rows (resumed by shard), its held-out queries and their
    exact top-10, and a placeholder file per row (hard links), so that `serve` finds a collection as a real one."""
    from clipkd.search.encoder import load_encoder
    from clipkd.search.exact import exact_search
    from clipkd.store import EmbeddingStore, ShardWriter, new_manifest

    out = root / f"scale-{n}"
    store = out / "store"
    centers = np.random.default_rng(7).standard_normal((clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    enc = load_encoder(student, device="cpu")
    have = len(EmbeddingStore(store)) if (store / "manifest.json").is_file() else 0
    if have < n:
        store.mkdir(parents=True, exist_ok=True)
        manifest = EmbeddingStore(store).manifest if have else \
            new_manifest(enc.describe(), out / "gallery", SHARD, store)
        writer = ShardWriter(store, manifest, SHARD)
        t = time.perf_counter()
        for start in range(have, n, SHARD):  # one seed per shard: the same rows whenever a shard is written
            m = min(SHARD, n - start)
            writer.add(_vectors(centers, m, 1000 + start // SHARD).astype(np.float16),
                       [_key(i) for i in range(start, start + m)], [0] * m)
            print(f"store {out.name}: {start + m:,} / {n:,} rows ({time.perf_counter() - t:.0f} s)", flush=True)
        writer.flush(final=True)
    gallery = out / "gallery"
    for d in range(0, (n + PER_DIR - 1) // PER_DIR):
        folder = gallery / f"{d:05d}"
        if (folder / ".done").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        one = gallery / f".placeholder-{d // 6}.jpg"  # some 65,000 links to one file at most
        if not one.is_file():
            from PIL import Image

            Image.new("RGB", (8, 8), (128, 128, 128)).save(one)
        for i in range(d * PER_DIR, min(n, (d + 1) * PER_DIR)):
            dst = str(gallery / _key(i))
            if not os.path.exists(dst):
                os.link(one, dst)
        (folder / ".done").touch()
    if not (out / "queries.npy").is_file() or not (out / "exact.npy").is_file():
        q = _vectors(centers, queries, 1)
        t = time.perf_counter()
        st = EmbeddingStore(store)
        _, want = exact_search(st, np.arange(n), q, 10)
        print(f"exact top-10 of {queries} queries over {n:,} rows: {time.perf_counter() - t:.0f} s", flush=True)
        np.save(out / "queries.npy", q)
        np.save(out / "exact.npy", want)
    return out


BUILD = """
import json, resource, sys, time
from clipkd.search.writers import index_store
t = time.perf_counter()
ix = index_store(sys.argv[1], sys.argv[2], kind=sys.argv[3], device="cpu", max_memory=sys.argv[4])
print("RESULT " + json.dumps({"build_s": time.perf_counter() - t, "build_peak_rss_mib":
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "info": ix.info}))
"""

ADD = """
import json, resource, sys, time
from clipkd.search.writers import append_store
t = time.perf_counter()
ix = append_store(sys.argv[1])
print("RESULT " + json.dumps({"add_s": time.perf_counter() - t, "rows": len(ix),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code: str, *args: str, python: str = sys.executable) -> dict:
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _pct(ms: list[float], q: float) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, int(q * len(ms)))]


def _recall(got: list[list[int]], want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w.tolist())) / 10 for g, w in zip(got, want, strict=True)]))


def query_http(url: str, q: np.ndarray, clients: int, per_client: int) -> tuple[list[float], list[list[int]]]:
    """``clients`` threads each sending ``per_client`` single queries by embedding; latencies (ms) and, per query in
    order of ``q`` (one client), the ids answered."""
    import httpx

    lat: list[float] = []
    ids: list[list[int]] = [[] for _ in range(len(q))]
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(per_client):
                j = (c * per_client + i) % len(q)
                t = time.perf_counter()
                r = http.post("/knn-service", json={"embedding_input": q[j].tolist(), "num_images": 10,
                                                    "deduplicate": False})
                ms = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    raise SystemExit(f"query failed: {r.status_code} {r.text[:200]}")
                with lock:
                    lat.append(ms)
                    if clients == 1:
                        ids[j] = [int(h["id"]) for h in r.json()]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, ids


def measure_clipkd(world: Path, student: Path, kind: str, budget: str, n: int, add_rows: int,
                   flags: list[str] | None = None, tag: str = "") -> list[dict]:
    """Build the index once, then serve it with each of ``flags`` (a `serve` command line's extra flags; None:
    one server, as before, named ``clipkd``) and measure each: one row per server."""
    from clipkd.search.layout import GENERATIONS

    q, want = np.load(world / "queries.npy"), np.load(world / "exact.npy")
    for old in (world / GENERATIONS, world / "index.json"):  # every run builds from the store
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    print(f"building {world.name} ({kind}, --max-memory {budget}) ...", flush=True)
    built = _run(BUILD, str(world), str(student), kind, budget)
    info = built["info"]
    rows = []
    for extra in flags if flags is not None else [None]:
        row = _serve_and_query(world, n, q, want, extra)
        rows.append(row | {"engine": _engine(extra, tag),
                           "kind": info["kind"], "params": info["params"], "budget": budget,
                           "build_s": round(built["build_s"], 1),
                           "build_peak_rss_mib": round(built["build_peak_rss_mib"]),
                           "index_mib": round(info["index_bytes"] / 2**20), "build_recall@10": info["recall@10"]})
    rows[0]["add_100k_s"] = round(add_and_roll_back(world, add_rows, student), 1) if add_rows else None
    return rows


def _engine(flags: str | None, tag: str = "") -> str:
    """A clipkd row's engine name: ``clipkd`` (one server, as before), else the serve flags, and the run's tag."""
    name = "clipkd" if flags is None else f"clipkd serve {flags}".strip()
    return f"{name} ({tag})" if tag else name


def _serve_and_query(world: Path, n: int, q: np.ndarray, want: np.ndarray, extra: str | None) -> dict:
    """Serve ``world`` (the lean server, with ``extra`` flags) and query it by embedding at 1 and 16 clients."""
    port = _free_port()
    t0 = time.perf_counter()
    python = str(LEAN) if LEAN.is_file() else sys.executable
    proc = subprocess.Popen([python, "-m", "clipkd.cli", "-q", "serve", "--index", str(world), "--port",
                             str(port), "--reload-s", "3600", *(extra or "").split()])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc)
        start_s = time.perf_counter() - t0
        start_rss = tree_rss_mb(proc.pid)
        query_http(url, q[:50], 1, 50)  # warm-up
        one, ids = query_http(url, q, 1, len(q))
        many, _ = query_http(url, q, 16, max(50, len(q) // 8))
        rss, pss = tree_rss_mb(proc.pid), tree_rss_mb(proc.pid, "Pss")  # the server and its workers
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"rows": n, "server": "lean" if LEAN.is_file() else "pytorch", "serve_start_s": round(start_s, 2),
            "serve_start_rss_mib": round(start_rss), "serve_rss_mib": round(rss), "serve_pss_mib": round(pss),
            "p50_ms": round(_pct(one, 0.5), 2), "p99_ms": round(_pct(one, 0.99), 2),
            "p50_ms_16": round(_pct(many, 0.5), 2), "p99_ms_16": round(_pct(many, 0.99), 2),
            "qps_16": round(len(many) / (sum(many) / 1000 / 16), 1), "recall@10": round(_recall(ids, want), 4)}


def add_and_roll_back(world: Path, n: int, student: Path) -> float:
    """Seconds to append ``n`` rows to the index without a rebuild; the store and index are then restored."""
    from clipkd.search.layout import GENERATIONS
    from clipkd.store import EmbeddingStore, ShardWriter

    saved = {f: (world / f).read_bytes() for f in ("index.json", "store/manifest.json")}
    gens = {p.name for p in (world / GENERATIONS).iterdir()}
    store = EmbeddingStore(world / "store")
    start, dim = len(store), store.embed_dim
    writer = ShardWriter(world / "store", store.manifest, SHARD)
    rng = np.random.default_rng(5)
    for s in range(0, n, SHARD):
        m = min(SHARD, n - s)
        v = rng.standard_normal((m, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        writer.add(v.astype(np.float16), [f"added/{start + s + i:08d}.jpg" for i in range(m)], [0] * m)
    writer.flush(final=True)
    shards = {s["file"] for s in EmbeddingStore(world / "store").manifest["shards"]} - \
        {s["file"] for s in store.manifest["shards"]}
    try:
        got = _run(ADD, str(world))
        if got["rows"] != start + n:
            raise SystemExit(f"append gave {got['rows']} rows, expected {start + n}")
        return got["add_s"]
    finally:
        for f, data in saved.items():
            (world / f).write_bytes(data)
        for p in (world / GENERATIONS).iterdir():
            if p.name not in gens:
                shutil.rmtree(p)
        for f in shards:
            stem = f.removesuffix(".npy")
            for ext in (".npy", ".txt", ".size.npy", ".fp.npy"):
                (world / "store" / f"{stem}{ext}").unlink(missing_ok=True)


MILVUS_BUILD = """
import json, sys, time
from clipkd.search.writers import index_store
t = time.perf_counter()
ix = index_store(sys.argv[1], sys.argv[2], kind="auto", device="cpu", backend="milvus", uri=sys.argv[3])
print("RESULT " + json.dumps({"build_s": time.perf_counter() - t, "info": ix.info}))
"""


def _peak_while(proc: subprocess.Popen) -> tuple[float, str]:
    """Peak RSS (MiB) of ``proc`` and its children (Milvus Lite's server process) until it exits; its stdout."""
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.5)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}):\n{err[-3000:]}")
    return peak, out


def measure_milvus(world: Path, student: Path, n: int, queries: int) -> dict:
    """The same store into a Milvus Lite collection (`index_store(backend="milvus")`), served by `clipkd serve`;
    ``queries`` of the held-out ones (Milvus Lite answers in about a second at 1M rows: not the full thousand)."""
    mv = world.parent / f"{world.name}-milvus"
    shutil.rmtree(mv, ignore_errors=True)
    mv.mkdir()
    (mv / "store").symlink_to(world / "store")
    print(f"Milvus Lite on {world.name} ...", flush=True)
    proc = subprocess.Popen([sys.executable, "-c", MILVUS_BUILD, str(mv), str(student), str(mv / "milvus.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, out = _peak_while(proc)
    built = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    q, want = np.load(world / "queries.npy")[:queries], np.load(world / "exact.npy")[:queries]
    port = _free_port()
    t0 = time.perf_counter()
    srv = subprocess.Popen([sys.executable, "-m", "clipkd.cli", "-q", "serve", "--index", str(mv), "--port",
                            str(port), "--reload-s", "3600"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, srv)
        start_s = time.perf_counter() - t0
        query_http(url, q[:5], 1, 5)
        one, ids = query_http(url, q, 1, len(q))
        many, _ = query_http(url, q, 16, max(4, len(q) // 16))
        rss = tree_rss_mb(srv.pid)
    finally:
        srv.terminate()
        srv.wait(timeout=60)
    info = built["info"]
    return {"rows": n, "engine": "milvus-lite", "server": "pytorch", "kind": info["kind"],
            "params": info["params"], "build_s": round(built["build_s"], 1), "build_peak_rss_mib": round(peak),
            "serve_start_s": round(start_s, 2), "serve_rss_mib": round(rss),
            "p50_ms": round(_pct(one, 0.5), 2), "p99_ms": round(_pct(one, 0.99), 2),
            "p50_ms_16": round(_pct(many, 0.5), 2), "p99_ms_16": round(_pct(many, 0.99), 2),
            "recall@10": round(_recall(ids, want), 4), "build_recall@10": info["recall@10"], "queries": len(q)}


AUTOFAISS = """
import json, resource, sys, time
import faiss, numpy as np
from autofaiss import build_index
emb, out, budget, avail = sys.argv[1:5]
t = time.perf_counter()
build_index(embeddings=emb, index_path=out + "/knn.index", index_infos_path=out + "/infos.json", metric_type="ip",
            max_index_memory_usage=budget, current_memory_available=avail, save_on_disk=True, verbose=30)
print("RESULT " + json.dumps({"build_s": time.perf_counter() - t,
      "build_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

AUTOFAISS_QUERY = """
import json, resource, sys, time
import faiss, numpy as np
out, qf = sys.argv[1:3]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t = time.perf_counter()
index = faiss.read_index(out + "/knn.index", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
infos = json.load(open(out + "/infos.json"))
faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
start = time.perf_counter() - t
start_rss = rss()
faiss.omp_set_num_threads(1)
q = np.load(qf).astype("float32")
lat, ids = [], []
for v in q[:50]:
    index.search(v[None], 10)
for v in q:
    t = time.perf_counter()
    _, i = index.search(v[None], 10)
    lat.append((time.perf_counter() - t) * 1000)
    ids.append(i[0].tolist())
print("RESULT " + json.dumps({"start_s": start, "start_rss": start_rss, "rss": rss(), "lat": lat, "ids": ids,
      "index_key": infos.get("index_key"), "index_param": infos["index_param"]}))
"""


def measure_autofaiss(world: Path, budget: str, avail: str, n: int) -> dict | None:
    venv = HERE / ".venv-autofaiss" / "bin" / "python"
    if not venv.is_file():
        print("autofaiss row skipped: make it with `python3 -m venv benchmarks/.venv-autofaiss && "
              "benchmarks/.venv-autofaiss/bin/pip install autofaiss`", flush=True)
        return None
    emb = world / "autofaiss-emb"
    shutil.rmtree(emb, ignore_errors=True)
    emb.mkdir()
    for f in sorted((world / "store").glob("shard-*.npy")):
        if not f.name.endswith((".size.npy", ".fp.npy")):
            os.symlink(f, emb / f.name)
    out = world / "autofaiss"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    print(f"autofaiss on {world.name} (max_index_memory_usage {budget}) ...", flush=True)
    built = _run(AUTOFAISS, str(emb), str(out), budget, avail, python=str(venv))
    got = _run(AUTOFAISS_QUERY, str(out), str(world / "queries.npy"), python=str(venv))
    want = np.load(world / "exact.npy")
    size = (out / "knn.index").stat().st_size
    return {"rows": n, "engine": "autofaiss", "kind": got["index_key"], "params": got["index_param"],
            "budget": budget, "build_s": round(built["build_s"], 1),
            "build_peak_rss_mib": round(built["build_peak_rss_mib"]), "index_mib": round(size / 2**20),
            "serve_start_s": round(got["start_s"], 2), "serve_start_rss_mib": round(got["start_rss"]),
            "serve_rss_mib": round(got["rss"]), "p50_ms": round(_pct(got["lat"], 0.5), 2),
            "p99_ms": round(_pct(got["lat"], 0.99), 2), "recall@10": round(_recall(got["ids"], want), 4),
            "in_process": True}


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (field, title) in zip(axes, [("p99_ms", "p99 of one query, ms"), ("build_peak_rss_mib",
                                         "build peak RSS, MiB"), ("recall@10", "recall@10 vs exact")], strict=True):
        for engine, marker in (("clipkd", "o"), ("autofaiss", "s"), ("milvus-lite", "^")):
            pts = sorted((r["rows"], r[field]) for r in rows if r["engine"] == engine and r.get(field) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=engine)
        ax.set_xscale("log")
        if field != "recall@10":
            ax.set_yscale("log")
        ax.set_xlabel("rows")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("search at scale (synthetic 512-d rows, one 2-core machine)")
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    return png


def write_results(runs: list[dict], a: argparse.Namespace) -> None:
    """The Markdown table, JSON and PNG of ``runs`` (written after every row: a run killed later keeps them)."""
    order = ["clipkd", "autofaiss", "milvus-lite"]
    runs = sorted(runs, key=lambda r: (r["rows"], order.index(r["engine"]) if r["engine"] in order else 0.5,
                                       r["engine"]))
    cols = ["rows", "engine", "kind", "build_s", "build_peak_rss_mib", "serve_start_s", "serve_rss_mib",
            "serve_pss_mib", "p50_ms",
            "p99_ms", "p99_ms_16", "recall@10", "add_100k_s"]
    shown = [{**r, "rows": f"{r['rows']:,}", "add_100k_s": r.get("add_100k_s") or "-",
              "p99_ms_16": r.get("p99_ms_16", "-"), "serve_pss_mib": r.get("serve_pss_mib", "-")} for r in runs]
    dates = sorted({r.get("date", "") for r in runs})
    body = table(shown, cols) + (
        f"\n\nSynthetic clustered {a.dim}-d unit vectors ({a.clusters} clusters) in fp16 shards, budget "
        f"`--max-memory {a.max_memory}` for clipkd and autofaiss; recall@10 against exact on {a.queries} held-out "
        "queries. clipkd: `clipkd serve` (the lean server, `pip install clipkd[serve]`, an ONNX student) over HTTP "
        "(`/knn-service` by embedding), p99 at 1 client and at 16 (`p99_ms_16`), served RSS after the queries "
        "(the server and its `--workers` together: `serve_rss_mib` sums each process's resident pages, so the index "
        "files' pages that workers share count once per worker; `serve_pss_mib` splits each shared page among the "
        "processes mapping it, what the machine really gives them; `-`: rows measured before it was recorded); "
        "`add_100k_s`: rows appended to the built index without a rebuild. autofaiss: its index memory-mapped and "
        "searched in-process, one thread (no HTTP), with the parameters it chose. Milvus Lite: the same store through "
        "`--backend milvus` (IVF_FLAT), served by `clipkd serve` (the PyTorch install: pymilvus is not in the lean "
        f"one), on {a.milvus_queries} of the queries; its RSS counts the embedded Milvus. "
        f"Measured {', '.join(dates)}.\n\n"
        f"`cd benchmarks && ../.venv/bin/python bench_search_scale.py --rows {' '.join(map(str, a.rows))} "
        f"--max-memory {a.max_memory} --out {a.out.relative_to(HERE) if a.out.is_relative_to(HERE) else a.out}`")
    report("Search at scale: rows, memory, latency, recall", body, a.out)
    a.out.with_suffix(".json").write_text(json.dumps(portable({"machine": machine(), "runs": runs}), indent=1) + "\n")
    plot(runs, a.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--max-memory", default="4G")
    ap.add_argument("--available", default="8G", help="autofaiss's current_memory_available")
    ap.add_argument("--add", type=int, default=100_000, help="rows appended to each served index (0: skip)")
    ap.add_argument("--autofaiss-rows", type=int, nargs="*", default=None,
                    help="row counts with an autofaiss row (default: all)")
    ap.add_argument("--milvus-rows", type=int, nargs="*", default=[1_000_000],
                    help="row counts with a Milvus Lite row (default: 1M)")
    ap.add_argument("--milvus-queries", type=int, default=200, help="held-out queries sent to Milvus Lite")
    ap.add_argument("--merge", action="store_true", help="keep the rows the results JSON already holds and measure "
                    "only the (rows, engine) pairs it lacks")
    ap.add_argument("--serve-flags", nargs="*", default=None, help="serve each index with each of these flag sets "
                    "(e.g. '' '--threads 1'), a row each named `clipkd serve FLAGS` (default: one server, `clipkd`)")
    ap.add_argument("--tag", default="", help="a note appended to the clipkd rows' engine names (what this run "
                    "changed), so that --merge keeps the earlier rows beside them")
    ap.add_argument("--data", type=Path, default=HERE / ".data" / "search-scale")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "search-scale.md")
    a = ap.parse_args()
    student = onnx_student(a.data)
    js = a.out.with_suffix(".json")
    runs = json.loads(js.read_text())["runs"] if a.merge and js.is_file() else []
    have = {(r["rows"], r["engine"]) for r in runs}

    def add(row: dict | None) -> None:
        if row:
            runs.append({**row, "date": time.strftime("%Y-%m-%d")})
            print(json.dumps(runs[-1]), flush=True)
            write_results(runs, a)

    for n in a.rows:
        world = make_world(a.data, n, a.dim, a.clusters, student, a.queries)
        names = [_engine(f, a.tag) for f in (a.serve_flags if a.serve_flags is not None else [None])]
        if any((n, name) not in have for name in names):
            for row in measure_clipkd(world, student, "auto", a.max_memory, n, a.add, a.serve_flags, a.tag):
                add(row)
        if (a.autofaiss_rows is None or n in a.autofaiss_rows) and (n, "autofaiss") not in have:
            add(measure_autofaiss(world, a.max_memory, a.available, n))
        if n in a.milvus_rows and (n, "milvus-lite") not in have:
            add(measure_milvus(world, student, n, a.milvus_queries))
    write_results(runs, a)


if __name__ == "__main__":
    main()
