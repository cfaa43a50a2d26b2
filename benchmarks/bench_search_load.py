"""Search under load: `clipkd serve` on the lean server (ONNX files, no PyTorch) over a 100,000-image index, driven
by a real load generator (locust, headless, closed-loop clients) with real JPEG uploads (500×375, multipart) and
text queries, at 1, 16 and 64 clients; the server as it starts by default next to the settings this benchmark
recommends, side by side in one run.

Student: `clipkd_rep_s` (the recommended search student) at 224 px, exported to ONNX (folded); text: the
teacher's text tower, open_clip ViT-B-32 (random weights: no download here; its cost is the real architecture's),
exported with a dynamic sequence axis. Gallery vectors are synthetic (clustered unit vectors); recall@10 of the
served index is measured against exact search over the same vectors. Each run's server metrics (batch sizes, queue
depth, text-cache hits) come from its `/metrics`.

    python bench_search_load.py --gallery 100000 --out results/search-load.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_search import _free_port, make_gallery, wait_until_serving
from common import REPO, machine, make_jpegs, portable, report, table

HERE = Path(__file__).resolve().parent
LEAN = Path(os.environ.get("CLIPKD_LEAN_PYTHON", REPO / ".venv-lean/bin/python"))

# a shop's query words: the texts of the load (a popular few repeat, as in a query log)
ADJ = ("red", "blue", "black", "white", "green", "leather", "cotton", "wooden", "vintage", "small", "large", "striped")
THING = ("shoes", "handbag", "t-shirt", "jacket", "chair", "lamp", "mug", "watch", "backpack", "dress", "sofa",
         "sunglasses", "umbrella", "scarf", "kettle", "bicycle")
ZH = ("红色的鞋", "黑色皮包", "白色T恤", "木椅子", "复古台灯", "蓝色连衣裙")


def query_texts(root: Path) -> tuple[Path, Path]:
    """``texts.txt``: 5,000 queries drawn (Zipf) from 400 distinct ones; ``unique.txt``: 104,544 distinct queries
    (every one a cache miss)."""
    rng = random.Random(0)
    distinct = [f"{a} {b} {t}" for a in ADJ for b in ADJ if a < b for t in THING]
    rng.shuffle(distinct)
    popular = distinct[:394] + list(ZH)
    weights = [1 / (i + 1) for i in range(len(popular))]
    log = rng.choices(popular, weights, k=5000)
    unique = [f"{t}, size {n}" for n in range(1, 100) for t in distinct]  # 104,544 texts, none repeated
    (root / "texts.txt").write_text("\n".join(log) + "\n", encoding="utf-8")
    (root / "unique.txt").write_text("\n".join(unique) + "\n", encoding="utf-8")
    return root / "texts.txt", root / "unique.txt"


def setup(root: Path, gallery: int) -> tuple[Path, Path]:
    """The exported student and text tower, the query JPEGs, and the 100k index (each reused when present)."""
    import torch

    from clipkd.export import export_model
    from clipkd.students.model import Student, StudentConfig, save_student
    from clipkd.teachers import load_clip, load_text_model

    root.mkdir(parents=True, exist_ok=True)
    saved = root / "teacher.spec"
    if not saved.is_file():
        torch.manual_seed(0)
        saved.write_text(load_clip("open_clip:ViT-B-32@random").save(root / "teacher"))
    spec = saved.read_text()
    student, onnx_student, onnx_text = root / "student.pt", root / "student.onnx", root / "text.onnx"
    if not student.is_file():
        torch.manual_seed(0)
        identity = load_text_model(spec, "cpu").identity
        save_student(student, Student(StudentConfig(arch="clipkd_rep_s", out_dim=512, image_size=224,
                                                    teacher=identity)))
    queries = make_jpegs(root / "queries", 64)
    if not onnx_student.is_file():
        export_model(student, onnx_student, images=queries)
    if not onnx_text.is_file():
        export_model(spec, onnx_text, tower="text")
    return make_gallery(root, gallery, 512, onnx_student, text_model=onnx_text), queries


def served_recall(index: Path, queries: int = 500) -> float:
    """recall@10 of the served index (its own search path) against exact search over the same vectors."""
    from clipkd.search.index import SearchIndex
    from clipkd.store import EmbeddingStore

    ix = SearchIndex(index)
    v = np.ascontiguousarray(EmbeddingStore(index / "store").embeddings(), dtype=np.float32)
    rng = np.random.default_rng(1)
    q = v[rng.choice(len(v), queries, replace=False)] + 0.05 * rng.normal(size=(queries, v.shape[1]))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    _, got = ix.search_vectors(q, 10)
    truth = np.argsort(-(q @ v.T), axis=1)[:, :10]
    return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]))


def text_tower(onnx_text: Path, texts: list[str], n: int = 60) -> list[dict]:
    """The exported text tower alone (ONNX Runtime, this process): median ms for one query text run to its end
    token (the dynamic sequence axis) against the whole context, at 1 thread and at every core, and the cosine
    between the two embeddings (the cut changes nothing)."""
    import statistics

    import torch

    from clipkd import onnxfile
    from clipkd.deployed import DeployedText

    rows, torch_threads = [], torch.get_num_threads()
    for threads in (1, None):
        onnxfile.set_threads(threads)
        tower = DeployedText(onnx_text)
        ms = {}
        for cut in (True, False):
            tower.cut = cut
            times = []
            for t in texts[:n]:
                t0 = time.perf_counter()
                tower.encode_text_np([t])
                times.append((time.perf_counter() - t0) * 1000)
            ms[cut] = statistics.median(times)
        tower.cut = True
        a = tower.encode_text_np(texts[:200])
        tower.cut = False
        b = tower.encode_text_np(texts[:200])
        rows.append({"threads": threads or os.cpu_count(), "cut_ms": ms[True], "full_ms": ms[False],
                     "min_cosine": float((a * b).sum(1).min())})
    onnxfile.set_threads(None)
    torch.set_num_threads(torch_threads)
    return rows


def query_costs(index: Path, jpegs: Path, n: int = 64) -> list[dict]:
    """What one image query costs in a server process on one thread (median ms of ``n``): decoding the upload,
    resizing and normalising it for the student, the student, the index search, the results as dicts."""
    import statistics

    import torch

    from clipkd import onnxfile
    from clipkd.search.index import SearchIndex
    from clipkd.search.service.requests import decode_image

    torch_threads = torch.get_num_threads()  # set_threads(1) sets torch's too: the report's machine line reads it
    onnxfile.set_threads(1)
    try:
        ix = SearchIndex(index)
        enc = ix.load_encoder(device="cpu")
        data = [p.read_bytes() for p in sorted(jpegs.rglob("*.jpg"))[:n]]
        imgs = [decode_image(d) for d in data]
        xs = [enc.preprocess(im) for im in imgs]
        q = enc.encode_batch(xs[:1])
        s, r = ix.search_vectors(q, 10)
        steps = {"decode the JPEG": lambda i: decode_image(data[i]), "resize + normalise": lambda i: enc.preprocess(
            imgs[i]), "student (batch 1)": lambda i: enc.encode_batch([xs[i]]),
            "search (k 10)": lambda i: ix.search_vectors(q, 10), "results": lambda i: ix.hits(s[0], r[0])}
        out = []
        for name, fn in steps.items():
            times = []
            for i in range(len(data)):
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1000)
            out.append({"step": name, "ms": statistics.median(times)})
    finally:
        onnxfile.set_threads(None)
        torch.set_num_threads(torch_threads)
    return out


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus exposition (0 when absent)."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def locust(url: str, clients: int, seconds: int, query: str, jpegs: Path, texts: Path, unique: bool = False) -> dict:
    """One headless locust run → p50 / p99 / queries/s / failed (its CSV's aggregated row)."""
    with tempfile.TemporaryDirectory(prefix="clipkd-locust-") as tmp:
        env = {**os.environ, "CLIPKD_LOAD_QUERY": query, "CLIPKD_LOAD_JPEGS": str(jpegs),
               "CLIPKD_LOAD_TEXTS": str(texts), "CLIPKD_LOAD_UNIQUE": "1" if unique else "0"}
        cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(clients),
               "-r", str(clients), "-t", f"{seconds}s", "--host", url, "--csv", f"{tmp}/run", "--only-summary",
               "--stop-timeout", "10", "--loglevel", "WARNING"]
        subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, timeout=seconds + 120)
        with open(f"{tmp}/run_stats.csv", newline="") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f)}
    out = _stats(rows.pop("Aggregated"))
    if len(rows) > 1:  # mixed: each kind's own figures too
        out["by_query"] = {name: _stats(r) for name, r in rows.items()}
    return out


def _stats(row: dict[str, str]) -> dict:
    return {"p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]), "qps": float(row["Requests/s"]),
            "failed": int(row["Failure Count"]), "requests": int(row["Request Count"])}


def serve_runs(index: Path, name: str, args: list[str], env: dict[str, str], plan: list[tuple[int, str, int]],
               jpegs: Path, texts: dict[str, Path]) -> list[dict]:
    """Start the lean server with ``args``, run every (clients, query, seconds) of ``plan`` against it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(LEAN), "-m", "clipkd.cli", "-q", "serve", "--index", str(index), "--port", str(port),
                             *args], env={**os.environ, **env})
    runs = []
    try:
        wait_until_serving(url, proc)
        locust(url, 2, 5, "mixed", jpegs, texts["log"])  # warm-up
        for clients, query, seconds in plan:
            import httpx

            before = httpx.get(url + "/metrics").text
            unique = query == "text-unique"
            r = locust(url, clients, seconds, "text" if unique else query, jpegs, texts["unique" if unique else "log"],
                       unique)
            after = httpx.get(url + "/metrics").text
            d = {k: metric(after, k) - metric(before, k) for k in
                 ("clipkd_batch_size_sum", "clipkd_batch_size_count", 'clipkd_text_cache_total{result="hit"}',
                  'clipkd_text_cache_total{result="miss"}')}
            hits, misses = d['clipkd_text_cache_total{result="hit"}'], d['clipkd_text_cache_total{result="miss"}']
            runs.append({"server": name, "rows": len_index(index), "clients": clients, "query": query, **r,
                         "mean_batch": d["clipkd_batch_size_sum"] / max(d["clipkd_batch_size_count"], 1),
                         "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
                         "serve_args": " ".join(args), "env": env, "date": time.strftime("%Y-%m-%d")})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return runs


def len_index(index: Path) -> int:
    return int(json.loads((index / "index.json").read_text())["rows"])


SERVERS = {  # name → (serve flags, environment)
    "default": ([], {}),
    # the libraries' own ways, as serve ran before 2026-12-07: ONNX Runtime's threads spin, OpenMP's spin a while
    # then sleep
    "spinning": ([], {"CLIPKD_SPIN": "1"}),
    "recommended": (["--workers", "2"], {}),
    # the recommended server with Python's collector as it is, as serve ran before 2026-12-08 (the default now
    # freezes what a server loaded out of the collector's full passes)
    "unfrozen": (["--workers", "2"], {"CLIPKD_GC_FREEZE": "0"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--seconds", type=int, default=30, help="length of each load run")
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    ap.add_argument("--root", default=".data/search-load")
    ap.add_argument("--out", default="results/search-load.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the results JSON")
    ap.add_argument("--costs", action="store_true", help="measure one image query's steps into the results JSON "
                    "(beside its load runs) and rewrite the Markdown")
    a = ap.parse_args()
    root = Path(a.root)
    if a.report_only or a.costs:  # the same load figures, the table and notes written again
        saved = json.loads(Path(a.out).with_suffix(".json").read_text())
        index = root / f"gallery-{a.gallery}-student-onnx"
        if a.costs:
            saved["costs"] = query_costs(index, root / "queries")
        write(saved["runs"], saved["text_tower"], a, index, saved["machine"], saved.get("costs"))
        return
    where = machine()  # before the text tower's timing sets this process's threads
    index, jpegs = setup(root, a.gallery)
    log, unique = query_texts(root)
    texts = {"log": log, "unique": unique}
    recall = served_recall(index)
    tower = text_tower(root / "text.onnx", unique.read_text("utf-8").splitlines())
    costs = query_costs(index, jpegs)
    print(json.dumps(tower), flush=True)
    plan = [(1, "image", a.seconds), (1, "text-unique", a.seconds), (1, "mixed", a.seconds),
            (16, "mixed", a.seconds), (64, "mixed", a.seconds)]
    runs = []
    for name in a.servers:
        flags, env = SERVERS[name]
        for r in serve_runs(index, name, flags, env, plan, jpegs, texts):
            runs.append(r | {"recall@10": recall})
    write(runs, tower, a, index, where, costs)


def write(runs: list[dict], tower: list[dict], a: argparse.Namespace, index: Path, where: str,
          costs: list[dict] | None = None) -> None:
    cols = ["server", "clients", "query", "p50 ms", "p99 ms", "queries/s", "failed", "mean batch", "text cache hits"]
    shown = [{"server": r["server"], "clients": r["clients"], "query": r["query"], "p50 ms": f"{r['p50_ms']:.0f}",
              "p99 ms": f"{r['p99_ms']:.0f}", "queries/s": f"{r['qps']:.1f}",
              "failed": f"{r['failed']} / {r['requests']}", "mean batch": f"{r['mean_batch']:.1f}",
              "text cache hits": "-" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.2f}"} for r in runs]
    kind = json.loads((index / "index.json").read_text())["kind"]
    flags = "; ".join(f"**{n}**: `serve {' '.join(f) or '(no flags)'}`" + _env(e)
                      for n, (f, e) in SERVERS.items() if n in a.servers)
    body = table(shown, cols) + (
        f"\n\n{a.gallery:,} rows ({kind} index, as `index build` chooses it; recall@10 of the served index against "
        f"exact search {runs[0]['recall@10']:.3f}); lean server (ONNX Runtime, no PyTorch); `clipkd_rep_s` student "
        f"at 224 px (ONNX fp32), text tower of open_clip ViT-B-32 (random weights); k = 10. Load: locust "
        f"{_locust_version()} headless, closed-loop clients, {a.seconds} s a run; `image`: 500×375 JPEG uploads "
        f"(multipart); `text-unique`: every text new (the text tower each time); `mixed`: 3 image queries to 1 text "
        f"query drawn from a log of 400 distinct texts (Zipf). Servers: {flags}. p50/p99 as locust reports them "
        f"(ms, rounded). The load generator runs on the same 2 cores.\n")
    body += "\n" + table([{"threads": t["threads"], "to the end token ms": f"{t['cut_ms']:.1f}",
                            "whole context ms": f"{t['full_ms']:.1f}", "speed-up": f"{t['full_ms'] / t['cut_ms']:.1f}×",
                            "min cosine": f"{t['min_cosine']:.6f}"} for t in tower],
                          ["threads", "to the end token ms", "whole context ms", "speed-up", "min cosine"])
    body += ("\n\nThe text tower alone (ONNX Runtime in this process, one new query text at a time, median of 60): "
             "run to the query's end token, as exports with a dynamic sequence axis are, against the whole 77-token "
             "context; min cosine between the two embeddings over 200 texts.\n")
    if costs:
        body += "\n" + table([{"step": c["step"], "ms": f"{c['ms']:.2f}"} for c in costs], ["step", "ms"])
        body += ("\n\nOne image query's steps in a server process on one thread (median ms over 64 of the query "
                 f"JPEGs): {sum(c['ms'] for c in costs):.1f} ms in all, before HTTP.\n")
    body += sizing(runs, Path(a.out).with_name("search-scale.json"))
    report(f"Search under load ({time.strftime('%Y-%m-%d')}, {where})", body, Path(a.out))
    Path(a.out).with_suffix(".json").write_text(json.dumps(portable({"machine": where, "runs": runs,
                                                                      "text_tower": tower, "costs": costs}),
                                                                     indent=1))


def sizing(runs: list[dict], scale: Path) -> str:
    """How to size a server: this run's mixed-load rows beside the clipkd rows of ``search-scale.json`` (1M and 10M
    rows, queries by embedding, 1 and 16 clients), one table."""
    rows = []
    for server in ("default", "recommended"):
        mine = {r["clients"]: r for r in runs if r["server"] == server and r["query"] in ("mixed", "image")
                and (r["clients"] > 1 or r["query"] == "image")}
        if 1 not in mine or 16 not in mine:
            continue
        rows.append({"rows": f"{mine[1]['rows']:,}", "server": server, "engine": "hnsw", "query": "image / mixed",
                     "p99 ms 1 client": f"{mine[1]['p99_ms']:.0f}", "p99 ms 16 clients": f"{mine[16]['p99_ms']:.0f}",
                     "queries/s 16 clients": f"{mine[16]['qps']:.0f}",
                     "p99 ms 64 clients": f"{mine[64]['p99_ms']:.0f}" if 64 in mine else "-",
                     "recall@10": f"{mine[1]['recall@10']:.3f}", "served MiB": "-",
                     "date": mine[1].get("date", "-")})
    if scale.is_file():
        for r in json.loads(scale.read_text())["runs"]:
            if r["engine"].startswith("clipkd") and "p99_ms_16" in r:
                params = ", ".join(f"{k} {v}" for k, v in r["params"].items())
                name, _, tag = r["engine"].partition(" (")
                flags = name.removeprefix("clipkd").removeprefix(" serve").strip()
                server = (f"`{flags}`" if flags else "default") + (f" ({tag}" if tag else "")
                rows.append({"rows": f"{r['rows']:,}", "server": server,
                             "engine": f"{r['kind']} ({params})",
                             "query": "embedding", "p99 ms 1 client": f"{r['p99_ms']:.1f}",
                             "p99 ms 16 clients": f"{r['p99_ms_16']:.1f}", "queries/s 16 clients": f"{r['qps_16']:.0f}",
                             "p99 ms 64 clients": "-", "recall@10": f"{r['recall@10']:.3f}",
                             "served MiB": f"{r['serve_pss_mib']:,}" if "serve_pss_mib" in r else "-",
                             "date": r["date"]})
    cols = ["rows", "server", "engine", "query", "p99 ms 1 client", "p99 ms 16 clients", "queries/s 16 clients",
            "p99 ms 64 clients", "recall@10", "served MiB", "date"]
    return ("\n**Sizing**: this run's rows beside `search-scale.json`'s clipkd rows (queries by embedding over "
            "`/knn-service`: no decoding, no model; served MiB: the memory of the server and all its workers after "
            "the queries, each shared page split among the processes mapping it (PSS); `-`: not measured).\n\n"
            + table(rows, cols) + "\n")


def _env(env: dict[str, str]) -> str:
    return f" with {', '.join(f'{k}={v}' for k, v in env.items())}" if env else ""


def _locust_version() -> str:
    import locust as lc

    return lc.__version__


if __name__ == "__main__":
    main()
