"""The request handling behind the app, independent of FastAPI: queries by image, text, id or vector, filters,
result counts, and what a client is shown of a result."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ClipkdError
from ..index import SearchIndex, check_model
from ..keys import split_key
from .batcher import Batcher
from .requests import QueryError, b64decode, decode_image, filter_value

MAX_K = 100
MAX_KNN = 10_000  # results one /knn-service answer holds at most (clip-retrieval clients ask for thousands)
DEDUP_COSINE = 0.94  # clip-retrieval's deduplicate: results at least this close to a better one are dropped
# clip-retrieval fields this server does not compute: accepted and reported (a response header and a log line),
# as clip-retrieval's own back end does when it has no safety, violence or aesthetic model loaded
NOT_COMPUTED = ("use_safety_model", "use_violence_detector", "aesthetic_score")
QUERY_TIMEOUT_S = 30.0  # an image query waits this long for the model at most (then 503; it is not run later)
TEXT_CACHE = 4096  # query texts whose embeddings a server keeps (a few MB at 512 dimensions)


class SearchService:
    """The request handling behind the app, independent of FastAPI (and unit-testable without it).

    Answers never carry the server's file paths: an image is its ``id`` and a ``url`` built from ``public_url``
    (never from the request's ``Host``); ``show_paths`` adds each image's path relative to the collection's root
    (an operator's choice)."""

    def __init__(self, index: SearchIndex, max_k: int = MAX_K, batch: bool = True,
                 public_url: str = "http://127.0.0.1:8000", show_paths: bool = False,
                 cache_size: int = TEXT_CACHE) -> None:
        if index.encoder is None:
            index.load_encoder()
        self.index, self.max_k = index, max_k
        self.batcher = Batcher() if batch else None
        self.text_lock = threading.Lock()
        self.text_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.cache_size = cache_size
        self.on_cache: Callable[[bool], None] | None = None  # told of each text query: from the cache or not
        self.public_url = public_url.rstrip("/")
        self.show_paths = show_paths
        self.root = _common_root(index.paths) if show_paths else ""
        self.reported = False  # the not-computed clip-retrieval fields were logged once

    def renewed(self, index: SearchIndex) -> SearchService:
        """This service over another generation of its index: same model (checked), batcher, text lock and
        settings. Requests hold the service they started with, so none mixes two generations."""
        check_model(index, self.index.encoder)
        index.encoder = self.index.encoder
        new = object.__new__(SearchService)
        new.__dict__.update(self.__dict__)
        new.index = index
        new.root = _common_root(index.paths) if self.show_paths else ""
        return new

    def public(self, hit: dict[str, Any]) -> dict[str, Any]:
        """A result as a client sees it: ``id``, ``score``, ``label``, ``url`` (``public_url`` + ``/images/{id}``:
        ``/search`` and ``/knn-service`` alike), and the relative path if shown."""
        out = {"id": hit["id"], "score": hit["score"], "label": hit["label"],
               "url": f"{self.public_url}/images/{hit['id']}"}
        if self.show_paths:
            out["path"] = _relative(hit["path"], self.root)
        return out

    def dedupe(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """clip-retrieval's ``deduplicate``: drop each result whose stored embedding has a cosine of at least
        :data:`DEDUP_COSINE` with a better-ranked one that was kept."""
        kept: list[dict[str, Any]] = []
        vectors: list[np.ndarray] = []
        for h in hits:
            v = self.index.vector(h["id"])
            v = v / max(float(np.linalg.norm(v)), 1e-12)
            if not vectors or float(np.max(np.stack(vectors) @ v)) < DEDUP_COSINE:
                kept.append(h)
                vectors.append(v)
        return kept

    def check_k(self, k: Any, limit: int | None = None, cap: bool = False, name: str = "k") -> int:
        """A result count: a whole number (``true``, ``1.7``, ``1e400`` and text are refused) from 1 to ``limit``
        (default ``max_k``); with ``cap``, a larger one is answered with what there is, as clip-retrieval does.
        ``name``: the field the client sent it in (``num_images`` for ``/knn-service``), as errors call it."""
        limit = self.max_k if limit is None else limit
        if isinstance(k, bool) or (isinstance(k, float) and not (np.isfinite(k) and k.is_integer())):
            raise QueryError(400, f"{name} must be a whole number")
        try:
            k = int(k)
        except (TypeError, ValueError, OverflowError):
            raise QueryError(400, f"{name} must be a whole number") from None
        if k < 1 or (k > limit and not cap):
            raise QueryError(400, f"{name} must be between 1 and {limit}, got {k}")
        return min(k, limit, max(1, len(self.index))) if cap else k

    def filter(self, label: Any = None, where: Any = None) -> np.ndarray | None:
        """The positions a query's ``label`` / ``where`` (``{"column": "value"}``) filter allows (None: no filter);
        a malformed filter, or one on a column the index does not have, is a 400."""
        if where is not None and not (isinstance(where, dict) and all(isinstance(c, str) for c in where)):
            raise QueryError(400, 'where must be an object of column: value, e.g. {"brand": "acme"}')
        label = None if label is None else filter_value("label", label)
        where = {c: filter_value(c, v) for c, v in (where or {}).items()}
        try:
            return self.index.allowed(label, where)
        except ClipkdError as e:
            raise QueryError(400, without_root(str(e), self.index.root)) from None

    def by_image(self, img: Image.Image, k: int, allowed: np.ndarray | None = None) -> list[dict[str, Any]]:
        x = self.index.encoder.preprocess(img)
        if self.batcher is not None:
            fut = self.batcher.submit(self.index, x, k, allowed)
            try:
                return fut.result(timeout=QUERY_TIMEOUT_S)
            except TimeoutError:
                fut.cancel()  # the batcher skips it if it has not started it
                raise QueryError(503, f"the query waited {QUERY_TIMEOUT_S:g} s for the model; the server is "
                                      "overloaded: try again shortly") from None
        q = self.index.encoder.encode_batch([x])
        scores, rows = self.index.search_vectors(q, k, allowed)
        return self.index.hits(scores[0], rows[0])

    def by_image_bytes(self, data: Any, k: int, allowed: np.ndarray | None = None,
                       b64: bool = False) -> list[dict[str, Any]]:
        """An uploaded image (bytes, or a base64 string with ``b64``) → results; decoded off the event loop."""
        return self.by_image(decode_image(b64decode(data) if b64 else data), k, allowed)

    def by_text(self, text: Any, k: int, allowed: np.ndarray | None = None) -> list[dict[str, Any]]:
        if not isinstance(text, str) or not text.strip():
            raise QueryError(400, "text must be a non-empty string")
        if not self.index.encoder.has_text:
            raise QueryError(400, f"{self.index.identity} has no text tower: search by image")
        scores, rows = self.index.search_vectors(self.text_vector(text.strip()[:1000]), k, allowed)
        return self.index.hits(scores[0], rows[0])

    def text_vector(self, text: str) -> np.ndarray:
        """A query text's embedding (1 × dim), from the bounded cache when the same text was asked before (the
        model is the same for every generation, so the cache outlives reloads). The lock guards the cache alone: a
        new text is embedded outside it, so hits never wait behind another query's text tower."""
        with self.text_lock:
            q = self.text_cache.get(text)
            if q is not None:
                self.text_cache.move_to_end(text)
        hit = q is not None
        if not hit:
            q = self.index.embed_text([text])
            if self.cache_size:
                with self.text_lock:
                    self.text_cache[text] = q
                    self.text_cache.move_to_end(text)
                    while len(self.text_cache) > self.cache_size:
                        self.text_cache.popitem(last=False)
        if self.on_cache is not None:
            self.on_cache(hit)
        return q

    def by_id(self, row: Any, k: int, allowed: np.ndarray | None = None) -> list[dict[str, Any]]:
        try:
            v = self.index.vector(int(row))
        except (KeyError, TypeError, ValueError):
            removed = isinstance(row, int) and self.removed(row)
            raise QueryError(404, f"image {row} was removed from this index" if removed else
                             f"no indexed image with id {str(row)[:40]!r}") from None
        scores, rows = self.index.search_vectors(v[None], k, allowed)
        return self.index.hits(scores[0], rows[0])

    def by_vector(self, vec: Any, k: int) -> list[dict[str, Any]]:
        try:
            v = np.asarray(vec, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise QueryError(400, "embedding_input must be a list of numbers") from None
        if v.size != self.index.info["embed_dim"] or not np.isfinite(v).all():
            raise QueryError(400, f"embedding_input must have {self.index.info['embed_dim']} finite numbers")
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        scores, rows = self.index.search_vectors(v[None], k)
        return self.index.hits(scores[0], rows[0])

    def by_json(self, body: Any) -> tuple[list[dict[str, Any]], int]:
        """``{"text"| "image" (base64) | "id", "k", "label", "where"}`` → results."""
        if not isinstance(body, dict):
            raise QueryError(400, "the body must be a JSON object")
        k = self.check_k(body.get("k", 10))
        allowed = self.filter(body.get("label"), body.get("where"))
        given = [key for key in ("text", "image", "id") if body.get(key) is not None]
        if len(given) != 1:
            raise QueryError(400, "give exactly one of text, image (base64) or id")
        if given[0] == "text":
            return self.by_text(body["text"], k, allowed), k
        if given[0] == "id":
            return self.by_id(body["id"], k, allowed), k
        return self.by_image_bytes(body["image"], k, allowed, b64=True), k

    def image_row(self, row: str) -> int:
        """An indexed row by its id; 404 for anything else (never a path from the client)."""
        if not (row.isascii() and row.isdigit()) or not 0 <= int(row) < len(self.index.paths):
            raise QueryError(404, "no such image")
        if not self.index.is_live(int(row)):
            raise QueryError(404, f"image {int(row)} was removed from this index" if self.removed(int(row)) else
                             "no such image")
        return int(row)

    def removed(self, row: int) -> bool:
        """Whether store row ``row`` is an image removed from the index (not one that never was in it)."""
        ix = self.index
        return 0 <= row < len(ix.paths) and ix.key(row) in ix.removed


def without_root(message: str, root: Path) -> str:
    """A library message as a client sees it: the index folder of this machine named as "this index"."""
    return message.replace(f"index {root}", "this index").replace(str(root), "this index")



def _common_root(paths: list[str]) -> str:
    files = [split_key(p)[0] for p in paths]  # a TSV row's key is FILE#ROW
    if not files:
        return ""
    root = os.path.commonpath(files)
    return os.path.dirname(root) if len(set(files)) == 1 else root


def _relative(path: str, root: str) -> str:
    file, row = split_key(path)
    return os.path.relpath(file, root) + (f"#{row}" if row else "") if root else path


def knn_fields(body: dict[str, Any], index_name: str) -> dict[str, Any]:
    """The clip-retrieval fields of a ``/knn-service`` body this server honours, checked: ``modality`` (image),
    ``use_mclip`` (no), ``deduplicate``; those it does not compute, and an ``indice_name`` other than the one index
    it serves (clients such as the seed's search script send ``laion5B-L-14`` by default), reported."""
    if body.get("modality", "image") != "image":  # clip-retrieval's text modality searches caption embeddings
        raise QueryError(400, "this index holds image embeddings only: modality must be image")
    if body.get("use_mclip") not in (None, False):
        raise QueryError(400, "use_mclip: this server has no multilingual CLIP text encoder; use_mclip must be false")
    dedup = body.get("deduplicate", True)
    if not isinstance(dedup, bool):
        raise QueryError(400, "deduplicate must be true or false")
    ignored = [f for f in NOT_COMPUTED if body.get(f) not in (None, False, "", 0)]
    name = body.get("indice_name")
    if name not in (None, "", index_name):
        ignored.append("indice_name")
    return {"deduplicate": dedup, "ignored": ignored}
