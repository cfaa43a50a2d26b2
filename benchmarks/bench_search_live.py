"""Search while the index changes, and filtered search: a synthetic 512-d gallery (100,000 rows by default) behind
`clipkd serve`, queried by embedding (clip-retrieval's `embedding_input`: the index is measured, not the encoder).

- **Updates while serving.** Rows are added (1,000, then 10,000) and removed (1,000) while one client queries
  without pause: the time from the start of the change until the server answers from the new generation, and the
  p50 / p99 of single queries before and during the change. An add is what `clipkd index add` does once the new
  images are embedded (the model's pass is not included: `bench_embed.py` measures it): rows appended to the store,
  then to the FAISS index (`clipkd.search.index.append_store`), no rebuild.
- **Filtered search.** `label`/`where` filters matching 1 %, 10 % and 50 % of the rows: p50 / p99 per query
  (in-process, one query at a time) and recall@10 against an exact search over the matching rows.

All figures come from this one run.

    python bench_search_live.py --gallery 100000 --out results/search-live.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from bench_search import _free_port, bench_student, link_placeholders, make_gallery, wait_until_serving
from common import machine, report, table


def _pct(ms: list[float], q: float) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")


class Client(threading.Thread):
    """One client querying by embedding without pause; records (start, ms, generation, status)."""

    def __init__(self, url: str, vectors: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.url, self.vectors, self.log = url, vectors, []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        rng = np.random.default_rng(0)
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                v = self.vectors[rng.integers(len(self.vectors))].tolist()
                t = time.perf_counter()
                r = c.post("/knn-service", json={"embedding_input": v, "num_images": 10, "deduplicate": False})
                ms = (time.perf_counter() - t) * 1000
                self.log.append((t, ms, int(r.headers.get("x-clipkd-generation", -1)), r.status_code))

    def between(self, t0: float, t1: float) -> list[float]:
        return [ms for t, ms, _, _ in list(self.log) if t0 <= t < t1]

    def first_answer_of(self, gen: int, after: float, timeout: float = 300) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            for t, ms, g, _ in list(self.log):
                if g >= gen and t >= after:
                    return t + ms / 1000
            time.sleep(0.01)
        raise TimeoutError(f"the server never answered from generation {gen}")


def append_rows(index: Path, n: int, seed: int) -> None:
    """``n`` synthetic rows appended to the index's store (as an embedding pass would write them)."""
    from clipkd.store import EmbeddingStore, ShardWriter

    store = EmbeddingStore(index / "store")
    dim = store.embed_dim
    rng = np.random.default_rng(seed)
    start = len(store)
    writer = ShardWriter(index / "store", store.manifest, 8192, set(store.paths))
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        v = rng.normal(size=(m, dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        writer.add(v.astype(np.float16), [f"new-{seed}-{start + s + i:07d}.jpg" for i in range(m)], [0] * m)
    writer.flush(final=True)
    link_placeholders(index / "gallery", EmbeddingStore(index / "store").paths)


def live_updates(index: Path, settle_s: float) -> list[dict]:
    from clipkd.search.index import SearchIndex
    from clipkd.search.writers import append_store, remove_from_index
    from clipkd.store import EmbeddingStore

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clipkd.cli", "-q", "serve", "--index", str(index), "--port",
                             str(port), "--reload-s", "0.25"], env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_until_serving(url, proc)
        vectors = np.asarray(EmbeddingStore(index / "store").embeddings()[:5000], dtype=np.float32)
        client = Client(url, vectors)
        client.start()
        time.sleep(settle_s)
        t_base = time.perf_counter()
        time.sleep(settle_s)
        base = client.between(t_base, time.perf_counter())
        rows.append({"change": "none (steady state)", "rows after": len(SearchIndex(index)), "write s": "-",
                     "visible after s": "-", "queries": len(base), "p50 ms": f"{statistics.median(base):.2f}",
                     "p99 ms": f"{_pct(base, 0.99):.2f}", "failed": 0})
        changes = [("add 1,000 rows", lambda: (append_rows(index, 1000, 1), append_store(index))),
                   ("add 10,000 rows", lambda: (append_rows(index, 10_000, 2), append_store(index))),
                   ("remove 1,000 rows", lambda: remove_from_index(index, SearchIndex(index).paths[:1000]))]
        for name, change in changes:
            gen = SearchIndex(index).generation + 1
            t0 = time.perf_counter()
            change()
            t_written = time.perf_counter()
            t_visible = client.first_answer_of(gen, t0)
            during = client.between(t0, t_visible)
            time.sleep(settle_s)
            failed = sum(1 for t, _, _, status in list(client.log) if t >= t0 and status != 200)
            rows.append({"change": name, "rows after": len(SearchIndex(index)), "write s": f"{t_written - t0:.2f}",
                         "visible after s": f"{t_visible - t0:.2f}", "queries": len(during),
                         "p50 ms": f"{statistics.median(during):.2f}" if during else "-",
                         "p99 ms": f"{_pct(during, 0.99):.2f}" if during else "-", "failed": failed})
            print(rows[-1], flush=True)
        client.stop.set()
        client.join(timeout=60)
        rows[0]["failed"] = sum(1 for *_, status in client.log if status != 200)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def filtered(index: Path, queries: int = 300) -> list[dict]:
    from clipkd.search.index import SearchIndex

    ix = SearchIndex(index)
    vectors = np.asarray(ix.store.embeddings(), dtype=np.float32)
    rng = np.random.default_rng(3)
    q = vectors[rng.choice(len(vectors), queries, replace=False)]
    q = q + 0.05 * rng.normal(size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows = []
    for share in (0.01, 0.1, 0.5):
        allowed = np.sort(rng.choice(len(ix.rows), int(share * len(ix.rows)), replace=False)).astype(np.int64)
        ix.search_vectors(q[:5], 10, allowed)  # warm
        ms, hits = [], 0
        exact_rows = vectors[ix.rows[allowed]]
        for i in range(queries):
            t = time.perf_counter()
            _, got = ix.search_vectors(q[i : i + 1], 10, allowed)
            ms.append((time.perf_counter() - t) * 1000)
            want = ix.rows[allowed[np.argsort(-(exact_rows @ q[i]))[:10]]]
            hits += len(set(got[0].tolist()) & set(want.tolist()))
        rows.append({"index": ix.info["kind"], "filter matches": f"{share:.0%} ({len(allowed):,} rows)",
                     "p50 ms": f"{statistics.median(ms):.2f}", "p99 ms": f"{_pct(ms, 0.99):.2f}",
                     "recall@10 vs exact filtered": f"{hits / (10 * queries):.3f}",
                     "unfiltered p50 ms": ""})
    ms = []
    for i in range(queries):
        t = time.perf_counter()
        ix.search_vectors(q[i : i + 1], 10)
        ms.append((time.perf_counter() - t) * 1000)
    for r in rows:
        r["unfiltered p50 ms"] = f"{statistics.median(ms):.2f}"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--settle-s", type=float, default=5.0, help="steady-state seconds before and after each change")
    ap.add_argument("--root", default=".data/search-live")
    ap.add_argument("--out", default="results/search-live.md")
    a = ap.parse_args()
    root = Path(a.root)
    student = bench_student(root)
    for old in root.glob("gallery-*"):  # the run changes its gallery: start from a fresh one
        shutil.rmtree(old)
    index = make_gallery(root, a.gallery, 512, student)
    kind = json.loads((index / "index.json").read_text())["kind"]
    filt = filtered(index)
    body = table(filt, ["index", "filter matches", "p50 ms", "p99 ms", "recall@10 vs exact filtered",
                        "unfiltered p50 ms"])
    body += (f"\n\nOne query at a time in-process over {a.gallery:,} synthetic 512-d rows ({kind} index, as `index "
             "build` chooses it), k = 10; the filter as `label`/`where` give it (FAISS positions allowed): under a "
             "tenth of the rows, an exact search over them; above, inside FAISS (`IDSelector`), exact again where "
             "FAISS finds fewer than k.\n\n")
    live = live_updates(index, a.settle_s)
    body += table(live, ["change", "rows after", "write s", "visible after s", "queries", "p50 ms", "p99 ms",
                         "failed"])
    body += ("\n\nOne client queries `clipkd serve` (`--reload-s 0.25`) by embedding over loopback HTTP without "
             "pause; a change's p50/p99 are over the queries sent between its start and the first answer from the "
             "new generation; *write s*: until the change is on disk (store rows + FAISS append, or tombstones); "
             "*visible after s*: until the server answers from it. *failed*: non-200 answers (the steady-state row: "
             "over the whole run).\n")
    out = Path(a.out)
    report(f"Search while it changes, and filtered search ({machine()})", body, out)
    out.with_suffix(".json").write_text(json.dumps({"gallery": a.gallery, "kind": kind, "machine": machine(),
                                                    "filtered": filt, "live": live}, indent=1) + "\n")


if __name__ == "__main__":
    main()
