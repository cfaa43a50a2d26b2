"""Choosing and tuning a FAISS index: memory budgets, the kind and its parameters for a row count, building and
filling it in chunks, and the recall@10 against exact search measured at build time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ClipkdError
from ..store import EmbeddingStore
from .exact import exact_search, rerank_search

EXACT_MAX = 30_000  # rows up to which `auto` keeps exact search: ~5 ms a query on 2 cores (17 ms at 100k, measured)
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
BACKENDS = ("faiss", "milvus")  # where an index's vectors live


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ClipkdError("search needs FAISS: pip install 'clipkd[search]' (faiss-cpu)") from None
    return faiss


HNSW_M = 32
RERANK = 8  # an IVF-PQ search re-ranks at least RERANK x k candidates exactly from the store
RERANK_MAX = 128  # ... and up to this many x k where the PQ codes alone rank too coarsely (measured at build)
TARGET_RECALL = 0.95  # an IVF index's nprobe is the smallest reaching this recall@10 at build (measured)
TRAIN_MAX = 200_000  # rows an IVF quantizer trains on (a sample: the build's memory is not the rows')
CHUNK = 65_536  # rows read and added at a time


@dataclass(frozen=True)
class IndexConfig:
    """How :func:`~clipkd.search.writers.build_index` builds an index (its settings, apart from what to embed).

    ``kind``: ``auto`` (exact up to :data:`EXACT_MAX` rows, HNSW while it fits ``max_memory``, IVF-PQ beyond:
    :func:`plan_index`), ``flat``, ``hnsw``, ``ivf`` or ``ivfpq``; ``max_memory``: bytes or ``"4G"`` (default half
    the machine's); ``backend``: ``faiss`` or ``milvus`` (``uri``: a Milvus Lite file or ``http://host:19530``;
    ``collection``: default the index folder's name); ``device`` / ``precision`` / ``batch_size`` / ``workers``:
    the embedding pass."""

    kind: str = "auto"
    device: str | None = "auto"
    precision: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    max_memory: int | str | None = None
    backend: str = "faiss"
    uri: str | None = None
    collection: str | None = None


def parse_memory(text: str | int | None) -> int | None:
    """Bytes of a budget as ``4G``, ``512M``, ``4GiB``, ``2.5G`` or a number of bytes (None: none given)."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise ClipkdError(f"`max_memory`={text!r} is not a size (e.g. 4G, 512M)") from None
    if value <= 0:
        raise ClipkdError(f"`max_memory`={text!r} must be more than nothing")
    return int(value * scale)


def default_budget() -> int:
    """The memory an index may take when no budget is given: half the machine's."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _nlist(n: int) -> int:
    return int(max(1, min(4 * np.sqrt(n), n // 39 if n >= 39 else 1, 4096)))


def _pq_m(d: int) -> list[int]:
    """PQ code sizes (bytes per row) that divide ``d`` into sub-vectors of at least 4 dimensions, largest first."""
    return [m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and d // m >= min(4, d)]


def index_bytes(kind: str, n: int, d: int, m: int | None = None) -> int:
    """What a FAISS index of ``kind`` over ``n`` ``d``-dim rows holds in memory while it is built (its vectors or
    codes, graph links, list ids and quantizer), plus the build's working set (one chunk, the training sample)."""
    work = min(n, CHUNK) * d * 6 + (min(n, TRAIN_MAX) * d * 4 if kind in ("ivf", "ivfpq") else 0)
    if kind == "flat":
        return n * d * 4 + work
    if kind == "hnsw":
        return int(n * (d * 4 + HNSW_M * 2 * 4 * 1.05 + 16)) + work
    lists = _nlist(n) * d * 4 * 2 + 8 * n
    if kind == "ivf":
        return n * d * 4 + lists + work
    return n * (m or _pq_m(d)[0]) + lists + 256 * d * 4 + work


def plan_index(kind: str, n: int, d: int, max_memory: int | None = None) -> dict[str, Any]:
    """The FAISS index to build for ``n`` rows under a memory budget, as autofaiss chooses: ``auto`` is exact
    (``flat``) up to :data:`EXACT_MAX` rows, HNSW while it fits, else IVF-PQ with the largest codes that fit
    (re-ranked exactly from the memory-mapped store at query time). An explicit kind that does not fit, or a budget
    too small for any, is one line naming the smallest budget that works."""
    if kind not in KINDS:
        raise ClipkdError(f"unknown index kind '{kind}' (choose from {', '.join(KINDS)})")
    budget = max_memory or default_budget()
    options = [("flat", None), ("hnsw", None), ("ivf", None), *(("ivfpq", m) for m in _pq_m(d))]
    if kind == "auto":
        wanted = ([("flat", None)] if n <= EXACT_MAX else []) + [("hnsw", None)] + \
            [o for o in options if o[0] == "ivfpq"]
    else:
        wanted = [o for o in options if o[0] == kind]
    for k, m in wanted:
        need = index_bytes(k, n, d, m)
        if need <= budget:
            return {"kind": k, "m": m, "bytes": need, "budget": budget}
    smallest = min(index_bytes(k, n, d, m) for k, m in wanted)
    what = "an index" if kind == "auto" else f"a {kind} index"
    raise ClipkdError(f"{what} of {n:,} rows of {d} dims does not fit in `max_memory`={_mib(budget)}: the smallest "
                      f"takes {_mib(smallest)}" + ("" if kind == "auto" else " (or choose `kind`=auto)"))


def _mib(b: int) -> str:
    return f"{b / (1 << 30):.2f} GiB" if b >= 1 << 30 else f"{b / (1 << 20):.0f} MiB"


def new_faiss(plan: dict[str, Any], n: int, d: int) -> tuple[Any, dict[str, Any]]:
    """An empty (untrained) FAISS inner-product index of ``plan`` (:func:`plan_index`) and its search parameters."""
    faiss = _faiss()
    kind = plan["kind"]
    if kind == "flat":
        return faiss.IndexFlatIP(d), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        return index, {"M": HNSW_M, "efSearch": 64}
    nlist = _nlist(n)
    if n < (256 if kind == "ivfpq" else nlist):
        raise ClipkdError(f"{n} images are too few for a {kind} index; use `kind`=flat")
    # a graph over the centroids past a thousand lists (IVF-HNSW, as autofaiss builds): assigning ten million rows
    # to 4,096 centroids exactly would cost most of the build
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 1024 else f"IVF{nlist}"
    m = plan.get("m") or _pq_m(d)[0]
    index = faiss.index_factory(d, coarse + (",Flat" if kind == "ivf" else f",PQ{m}x8"), faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    params: dict[str, Any] = {"nlist": nlist, "nprobe": min(nlist, 16)}
    if kind == "ivfpq":
        params.update(m=m, rerank=RERANK)
    return index, params


def _set_nprobe(index: Any, nprobe: int) -> None:
    _faiss().extract_index_ivf(index).nprobe = nprobe


def fill_faiss(index: Any, chunks: Any, sample: np.ndarray | None) -> Any:
    """Train ``index`` on ``sample`` (IVF quantizers) and add ``chunks`` (float32 arrays) one at a time."""
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for part in chunks:
        index.add(np.ascontiguousarray(part, dtype=np.float32))
    return index


def make_faiss(vectors: np.ndarray, kind: str, seed: int = 0,
               max_memory: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index of ``kind`` over in-memory ``vectors`` (N, D) float32, and its search
    parameters (an index folder's build streams its store instead: :func:`index_store`)."""
    n, d = vectors.shape
    plan = plan_index(kind, n, d, max_memory)
    index, params = new_faiss(plan, n, d)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, min(n, TRAIN_MAX), replace=False))] if not index.is_trained else None
    fill_faiss(index, (vectors[i:i + CHUNK] for i in range(0, n, CHUNK)), sample)
    if "nprobe" in params:
        _set_nprobe(index, params["nprobe"])
    return index, params


def recall_at_10(index: Any, vectors: np.ndarray, queries: int = 1000, seed: int = 0, rerank: int = 1) -> float:
    """Recall@10 of ``index`` against exact inner-product search, on stored vectors used as queries (in memory)."""
    n = len(vectors)
    q = vectors[np.random.default_rng(seed).choice(n, min(queries, n), replace=False)]
    k = min(10, n)
    _, want = exact_search(vectors, np.arange(n), q, k)
    _, got = rerank_search(index, q, k, vectors, np.arange(n), rerank)
    return _overlap(want, got)


def _overlap(want: np.ndarray, got: np.ndarray) -> float:
    k = want.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want.tolist(), got.tolist(), strict=True)]))


def tune(index: Any, params: dict[str, Any], store: EmbeddingStore, rows: np.ndarray,
         seed: int = 0) -> tuple[float, int]:
    """Recall@10 against exact search on stored rows as queries (a hundred to a thousand, fewer as rows grow: the
    exact side reads every row), choosing an IVF index's ``nprobe`` or an HNSW graph's ``efSearch`` as the
    smallest reaching :data:`TARGET_RECALL` (recorded in ``params``); returns (recall, queries)."""
    n = len(rows)
    nq = int(np.clip(2e11 / max(1, n * store.embed_dim), 100, 1000))
    pick = np.sort(np.random.default_rng(seed).choice(n, min(nq, n), replace=False))
    q = store.gather(rows[pick]).astype(np.float32)
    k = min(10, n)
    _, want = exact_search(store, rows, q, k)
    rerank = int(params.get("rerank", 1))
    if "efSearch" in params:  # HNSW: the smallest graph walk that reaches the target
        for ef in (64, 96, 128, 192, 256):
            index.hnsw.efSearch = ef
            recall = _overlap(want, index.search(q, k)[1])
            params["efSearch"] = ef
            if recall >= TARGET_RECALL:
                break
        return recall, len(q)
    if "nprobe" not in params:
        return _overlap(want, rerank_search(index, q, k, store, rows, rerank)[1]), len(q)
    nlist = params["nlist"]
    probes = sorted({min(nlist, p) for p in (8, 16, 32, 64, 128, 256, 512)})
    # IVF-PQ: more lists stop paying once the true neighbours are among the probed rows but ranked below the re-rank
    # cut by their coarse codes; then re-rank more candidates (cheap reads from the store) before probing further
    factors = [f for f in (RERANK, 16, 32, 64, RERANK_MAX) if f >= rerank] if "rerank" in params else [1]
    recall = 0.0
    for factor in factors:
        last = -1.0
        for nprobe in probes:
            _set_nprobe(index, nprobe)
            recall = _overlap(want, rerank_search(index, q, k, store, rows, factor)[1])
            params["nprobe"] = nprobe
            if "rerank" in params:
                params["rerank"] = factor
            if recall >= TARGET_RECALL:
                return recall, len(q)
            if recall - last < 0.01 and factor < factors[-1]:
                break  # probing more lists no longer pays at this re-rank depth
            last = recall
    return recall, len(q)


def _set_nprobe_from(index: Any, info: dict[str, Any]) -> None:
    if info.get("kind") in ("ivf", "ivfpq"):
        _set_nprobe(index, int(info.get("params", {}).get("nprobe", 16)))


