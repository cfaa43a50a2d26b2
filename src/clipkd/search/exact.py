"""Exact search over stored rows, a chunk at a time (memory flat in the rows), and the exact re-ranking of an
approximate index's candidates."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..store import EmbeddingStore

MAX_STEP = 262_144  # rows scored at a time at most (a few queries: the scores of one step stay ~64 MiB)


def exact_search(store: EmbeddingStore | np.ndarray, rows: np.ndarray, q: np.ndarray,
                 k: int, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, positions into ``rows``) of unit queries ``q`` among store rows ``rows``, read
    ``step`` rows at a time (default: as many as keep one chunk's scores near 64 MiB; memory flat in the rows);
    ``store`` may be an in-memory array of rows instead."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    best_s = np.zeros((len(q), 0), np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    step = int(step or max(64, min(MAX_STEP, (1 << 24) // max(1, len(q)))))
    parts = store.chunks(rows, step) if isinstance(store, EmbeddingStore) else \
        ((rows[i:i + step], store[rows[i:i + step]]) for i in range(0, len(rows), step))
    for start, (_, v) in zip(range(0, len(rows), step), parts, strict=True):
        sims = q @ np.asarray(v, dtype=np.float32).T
        kk = min(k, sims.shape[1])
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    if best_s.shape[1] < k:  # fewer rows than k: padded as FAISS pads
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return best_s, best_i


def rerank_search(index: Any, q: np.ndarray, k: int, store: EmbeddingStore | np.ndarray, rows: np.ndarray,
                  rerank: int = 1, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-``k`` (scores, positions); with ``rerank`` > 1 the top ``rerank * k`` candidates are scored exactly
    against the stored rows (``rows``: FAISS position → store row) and the best ``k`` kept."""
    if rerank <= 1:
        return index.search(q, k, params=params)
    kk = min(int(index.ntotal), rerank * k)
    _, pos = index.search(q, kk, params=params)
    valid = pos >= 0
    flat = rows[np.clip(pos, 0, None)].reshape(-1)
    v = store.gather(flat) if isinstance(store, EmbeddingStore) else store[flat]
    exact = np.einsum("qkd,qd->qk", np.asarray(v, np.float32).reshape(len(q), kk, -1), q)
    exact[~valid] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    got = np.take_along_axis(pos, order, 1)
    return np.take_along_axis(exact, order, 1), np.where(np.take_along_axis(valid, order, 1), got, -1)


