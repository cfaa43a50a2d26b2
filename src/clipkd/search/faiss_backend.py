"""The FAISS backend of an index: one generation's FAISS file, its rows and tombstones, searched with filters
(``IDSelector``), removed rows skipped, and IVF-PQ candidates re-ranked exactly from the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipkdError
from ..store import EmbeddingStore
from .exact import exact_search, rerank_search
from .layout import GENERATIONS, REBUILD, _Pruned, read_generation, read_info
from .planning import _faiss, _set_nprobe_from


class FaissBackend:
    """The vectors of an index folder in FAISS: the generation ``index.json`` names (retried when a newer writer
    prunes it while it is being opened), memory-mapped."""

    name = "faiss"

    def __init__(self, root: Path, info: dict[str, Any], store: EmbeddingStore) -> None:
        self.root, self.store = root, store
        gen, self.info = self._open(root, info)
        self.generation, self.index, self.rows = gen.number, gen.index, gen.rows
        self.tombstones, self.removed, self.columns = gen.tombstones, gen.removed, gen.columns
        if len(self.rows) and int(self.rows.max()) >= len(store):
            raise ClipkdError(f"index {root} is damaged: its FAISS rows name store rows the store does not hold; "
                              f"{REBUILD}")
        try:
            self._set_search_params()
        except AttributeError:
            raise ClipkdError(f"index {root} is damaged: index.json says kind {self.info['kind']!r} but its FAISS "
                              f"file holds a {type(self.index).__name__}; {REBUILD}") from None
        self._allowed: dict[tuple, np.ndarray] = {}
        if int(self.info.get("params", {}).get("rerank", 1)) > 1:  # every query reads candidates from the store
            store.prefetch()

    @staticmethod
    def _open(root: Path, info: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        for _ in range(5):  # a generation pruned by a newer writer between reading index.json and its files
            try:
                return read_generation(root, info, mmap=True), info
            except _Pruned:
                again = read_info(root)
                if again.get("generation") == info.get("generation"):
                    raise ClipkdError(f"index {root} is damaged: {GENERATIONS}/{info.get('generation')} is gone; "
                                      f"{REBUILD}") from None
                info = again
        raise ClipkdError(f"index {root} changes faster than it can be opened; try again")

    def __len__(self) -> int:
        """Rows a query can return (FAISS rows less the tombstones of removed images)."""
        return int(self.index.ntotal) - len(self.tombstones)

    def live(self, n: int) -> np.ndarray:
        """Which of the store's ``n`` rows a query can return."""
        live = np.zeros(n, dtype=bool)
        live[self.rows] = True
        live[self.rows[self.tombstones]] = False
        return live

    def _set_search_params(self) -> None:
        kind = self.info.get("kind")
        if kind == "hnsw":
            self.index.hnsw.efSearch = int(self.info.get("params", {}).get("efSearch", 64))
        elif kind in ("ivf", "ivfpq"):
            _set_nprobe_from(self.index, self.info)

    def allowed(self, want: list[tuple[str, str]], codes: dict[str, tuple[np.ndarray, list[str]]]) -> np.ndarray:
        """The FAISS positions whose rows hold every ``(column, value)`` of ``want`` (cached per filter)."""
        frozen = tuple(want)
        if frozen in self._allowed:
            return self._allowed[frozen]
        ok = np.ones(len(self.rows), dtype=bool)
        ok[self.tombstones] = False
        for c, v in want:
            col, values = codes[c]
            if str(v) not in values:
                ok[:] = False
                break
            ok &= np.asarray(col)[self.rows] == values.index(str(v))
        if len(self._allowed) > 256:
            self._allowed.clear()
        self._allowed[frozen] = np.flatnonzero(ok).astype(np.int64)
        return self._allowed[frozen]

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, store rows) for unit query vectors among the FAISS positions ``allowed`` (see
        :meth:`clipkd.search.index.SearchIndex.search_vectors`)."""
        if allowed is None and len(self.tombstones):
            scores, pos = self._skip_tombstones(q, min(k, max(1, len(self))))
        elif allowed is None:
            scores, pos = self._search(q, min(k, max(1, len(self))))
        elif not len(allowed):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        elif len(allowed) * 10 < len(self):
            scores, pos = self._exact(q, k, allowed)
        else:
            want = min(k, len(allowed))
            scores, pos = self._search(q, want, self._params(self._selector(allowed), k,
                                                             len(allowed) / max(1, len(self))))
            if (pos < 0).sum(1).max() > 0:  # the graph or the probed lists ran out of matches: exact instead
                scores, pos = self._exact(q, k, allowed)
        return scores, np.where(pos >= 0, self.rows[np.clip(pos, 0, None)], -1)

    def _selector(self, allowed: np.ndarray) -> Any:
        """A FAISS selector of ``allowed`` (kept per array: :meth:`allowed` caches its arrays)."""
        cache = self.__dict__.setdefault("_selectors", {})
        key = (allowed.__array_interface__["data"][0], len(allowed))
        if key not in cache or cache[key][0] is not allowed:
            if len(cache) > 64:
                cache.clear()
            cache[key] = (allowed, _faiss().IDSelectorBatch(allowed))
        return cache[key][1]

    def _params(self, sel: Any, k: int, share: float = 1.0) -> Any:
        """Search parameters with selector ``sel`` letting ``share`` of the rows through: the graph walk (HNSW) or
        the lists probed (IVF) grow as the share shrinks, so that as many matching candidates are seen as an
        unfiltered search sees (recall@10 by filter share: ``benchmarks/results/search-live.md``)."""
        faiss = _faiss()
        kind = self.info["kind"]
        grow = 1 / max(share, 0.05)
        if kind == "hnsw":
            ef = max(self.index.hnsw.efSearch, 4 * k)
            return faiss.SearchParametersHNSW(sel=sel, efSearch=int(min(2048, ef * grow)))
        if kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(min(self.index.nlist, self.index.nprobe * grow)))
        return faiss.SearchParameters(sel=sel)

    def _skip_tombstones(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` FAISS positions that are not tombstones: the search skips them (``IDSelectorNot``); where an
        approximate search then finds fewer than ``k``, the plain search is oversampled by the tombstones."""
        faiss = _faiss()
        if not hasattr(self, "_not_removed"):
            inner = faiss.IDSelectorBatch(self.tombstones)
            self._not_removed = (inner, faiss.IDSelectorNot(inner))  # the inner selector must outlive the outer
        scores, pos = self._search(q, k, self._params(self._not_removed[1], k))
        if (pos < 0).any():
            more = min(int(self.index.ntotal), k + len(self.tombstones))
            s2, p2 = self.index.search(q, more)
            dead = np.isin(p2, self.tombstones) | (p2 < 0)
            order = np.argsort(dead, axis=1, kind="stable")[:, :k]
            scores, pos = np.take_along_axis(s2, order, 1), np.where(
                np.take_along_axis(dead, order, 1), -1, np.take_along_axis(p2, order, 1))
        return scores, pos

    def _search(self, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``k`` positions; an IVF-PQ index's candidates (``rerank`` times ``k``) re-ranked exactly from
        the memory-mapped store (its codes alone rank coarsely)."""
        return rerank_search(self.index, q, k, self.store, self.rows,
                             int(self.info.get("params", {}).get("rerank", 1)), params)

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` among FAISS positions ``allowed``, from the stored embeddings (a chunk at a time)."""
        scores, at = exact_search(self.store, self.rows[allowed], q, k)
        return scores, np.where(at >= 0, allowed[np.clip(at, 0, None)], -1)
