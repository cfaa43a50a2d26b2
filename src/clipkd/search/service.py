"""``clipkd serve``: an index behind HTTP (FastAPI): JSON search, images, a web page, and clip-retrieval's
``/knn-service`` protocol.

Image queries from concurrent requests are batched (:class:`Batcher`): one thread runs the model on all the
queries waiting for it, so 16 clients share forward passes instead of queueing 16 single-image ones.

No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations, and ``Request`` is
imported inside :func:`create_app` (FastAPI is optional).
"""

import base64
import binascii
import errno
import io
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import to_rgb
from ..errors import ClipkdError
from .index import SearchIndex

log = logging.getLogger(__name__)
MAX_UPLOAD = 20 << 20  # bytes of one uploaded image
MAX_PIXELS = 40_000_000  # pixels of one query image (decompression bombs are refused before decoding)
MAX_K = 100
MAX_KNN = 10_000  # results one /knn-service answer holds at most (clip-retrieval clients ask for thousands)
DEDUP_COSINE = 0.94  # clip-retrieval's deduplicate: results at least this close to a better one are dropped
# clip-retrieval fields this server does not compute: accepted and reported (a response header and a log line),
# as clip-retrieval's own back end does when it has no safety, violence or aesthetic model loaded
NOT_COMPUTED = ("use_safety_model", "use_violence_detector", "aesthetic_score")
PAGE = Path(__file__).with_name("page.html")
RELOAD_S = 1.0  # how often a server looks for a newer generation of its index (seconds)


class QueryError(Exception):
    """A bad query: HTTP ``status`` with a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes → RGB image; 413 for too many pixels (checked from the header, before decoding), 400 otherwise."""
    if not data:
        raise QueryError(400, "empty image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise QueryError(413, f"image of {w}×{h} pixels is larger than the {max_pixels} allowed")
        img.load()
        return to_rgb(img)
    except QueryError:
        raise
    except Image.DecompressionBombError as e:
        raise QueryError(413, f"image refused: {e}") from None
    except Image.UnidentifiedImageError:  # Pillow's message names its BytesIO object: not for a client
        raise QueryError(400, "cannot decode the image: not a format this server reads (JPEG, PNG, WebP, GIF, BMP, "
                              "TIFF)") from None
    except Exception as e:  # noqa: BLE001 - anything Pillow cannot decode is the client's problem
        raise QueryError(400, f"cannot decode the image ({type(e).__name__}: {_no_repr(str(e))[:200]})") from None


def _no_repr(text: str) -> str:
    """``text`` without Python object reprs (``<_io.BytesIO object at 0x7f...>``): what a client is shown."""
    import re

    return re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "the upload", text)


class Batcher:
    """One worker thread that embeds and searches image queries in batches.

    ``submit`` returns a future; the worker takes the first waiting query plus every query already queued behind
    it (up to ``max_batch``; with ``window_s`` > 0 it also waits that long for more), runs the model once and FAISS
    once for all of them. With the default ``window_s=0`` a lone query never waits; under load the queries that
    arrived while the previous batch ran form the next one.
    """

    def __init__(self, max_batch: int = 32, window_s: float = 0.0) -> None:
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for the benchmark and tests)
        self.thread = threading.Thread(target=self._run, name="clipkd-batcher", daemon=True)
        self.thread.start()

    def submit(self, index: SearchIndex, image: Any, k: int, allowed: np.ndarray | None = None) -> Future:
        """Queue a preprocessed image for ``index`` (the generation the request holds: queries of two generations
        in one batch are searched each in its own)."""
        fut: Future = Future()
        self.queue.put((index, image, k, allowed, fut))
        return fut

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.perf_counter() + self.window_s
            while len(items) < self.max_batch:
                wait = deadline - time.perf_counter()
                try:
                    items.append(self.queue.get(timeout=max(wait, 0)) if wait > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                q = items[0][0].encoder.encode_batch([it[1] for it in items])  # one model for every generation
                self.batches.append(len(items))
                groups: dict[tuple[int, int], list[int]] = {}
                for i, (index, _, _, allowed, _) in enumerate(items):
                    groups.setdefault((id(index), id(allowed)), []).append(i)
                for members in groups.values():
                    index, allowed = items[members[0]][0], items[members[0]][3]
                    scores, rows = index.search_vectors(q[members], max(items[i][2] for i in members), allowed)
                    for j, i in enumerate(members):
                        k = items[i][2]
                        items[i][4].set_result(index.hits(scores[j][:k], rows[j][:k]))
            except Exception as e:  # noqa: BLE001 - hand the failure to every waiting request
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(e)


class SearchService:
    """The request handling behind the app, independent of FastAPI (and unit-testable without it).

    Answers never carry the server's file paths: an image is its ``id`` and a ``url`` built from ``public_url``
    (never from the request's ``Host``); ``show_paths`` adds each image's path relative to the collection's root
    (an operator's choice)."""

    def __init__(self, index: SearchIndex, max_k: int = MAX_K, batch: bool = True,
                 public_url: str = "http://127.0.0.1:8000", show_paths: bool = False) -> None:
        if index.encoder is None:
            index.load_encoder()
        self.index, self.max_k = index, max_k
        self.batcher = Batcher() if batch else None
        self.text_lock = threading.Lock()
        self.public_url = public_url.rstrip("/")
        self.show_paths = show_paths
        self.root = _common_root(index.paths) if show_paths else ""
        self.reported = False  # the not-computed clip-retrieval fields were logged once

    def renewed(self, index: SearchIndex) -> "SearchService":
        """This service over another generation of its index: same model (checked), batcher, text lock and
        settings. Requests hold the service they started with, so none mixes two generations."""
        from .index import check_model

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
        label = None if label is None else _filter_value("label", label)
        where = {c: _filter_value(c, v) for c, v in (where or {}).items()}
        try:
            return self.index.allowed(label, where)
        except ClipkdError as e:
            raise QueryError(400, _without_root(str(e), self.index.root)) from None

    def by_image(self, img: Image.Image, k: int, allowed: np.ndarray | None = None) -> list[dict[str, Any]]:
        x = self.index.encoder.preprocess(img)
        if self.batcher is not None:
            return self.batcher.submit(self.index, x, k, allowed).result(timeout=60)
        q = self.index.encoder.encode_batch([x])
        scores, rows = self.index.search_vectors(q, k, allowed)
        return self.index.hits(scores[0], rows[0])

    def by_text(self, text: Any, k: int, allowed: np.ndarray | None = None) -> list[dict[str, Any]]:
        if not isinstance(text, str) or not text.strip():
            raise QueryError(400, "text must be a non-empty string")
        if not self.index.encoder.has_text:
            raise QueryError(400, f"{self.index.identity} has no text tower: search by image")
        with self.text_lock:
            q = self.index.embed_text([text.strip()[:1000]])
        scores, rows = self.index.search_vectors(q, k, allowed)
        return self.index.hits(scores[0], rows[0])

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
        return self.by_image(decode_image(b64decode(body["image"])), k, allowed), k

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
        return 0 <= row < len(ix.paths) and ix.paths[row] in ix.removed


def _filter_value(column: str, value: Any) -> str:
    """A filter's value as the column holds it: a string, or a whole number (``2024`` matches ``"2024"``); anything
    else is a 400, whether it came as ``label`` or inside ``where``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise QueryError(400, f"the filter on {column[:40]!r} must be a string or a whole number")


def _without_root(message: str, root: Path) -> str:
    """A library message as a client sees it: the index folder of this machine named as "this index"."""
    return message.replace(f"index {root}", "this index").replace(str(root), "this index")


def _validation_message(errors: Any) -> str:
    """FastAPI's validation errors as one line: where and what (``query thumb: Input should be a valid
    integer``), never the input."""
    parts = [f"{' '.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors]
    return "; ".join(parts)[:300] or "invalid request"


def b64decode(data: Any) -> bytes:
    if not isinstance(data, str):
        raise QueryError(400, "image must be a base64 string")
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError(400, "image is not valid base64") from None
    if len(raw) > MAX_UPLOAD:
        raise QueryError(413, f"image larger than {MAX_UPLOAD} bytes")
    return raw


def _common_root(paths: list[str]) -> str:
    import os

    from .keys import split_key

    files = [split_key(p)[0] for p in paths]  # a TSV row's key is FILE#ROW
    if not files:
        return ""
    root = os.path.commonpath(files)
    return os.path.dirname(root) if len(set(files)) == 1 else root


def _relative(path: str, root: str) -> str:
    import os

    from .keys import split_key

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


def create_app(index: SearchIndex | str | Path, batch: bool = True, max_k: int = MAX_K,
               public_url: str = "http://127.0.0.1:8000", show_paths: bool = False,
               images: str | Path | None = None, token: str | None = None, reload_s: float = RELOAD_S):
    """The FastAPI app serving ``index`` (loaded with the model that built it); result URLs start with
    ``public_url`` (the address clients reach the server at), never with what a request's ``Host`` says.
    ``images``: where the collection's images are on this machine (default: where the index records them); a root
    that is not there, or lacks most of the rows, is refused in one line before serving. ``token``: the bearer
    token that ``/index/add`` and ``/index/remove`` require (None: they are off). Every ``reload_s`` seconds the
    app looks for a newer generation of the index (written by ``clipkd index add/remove/compact``) and swaps to it
    between requests (0: never)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    except ImportError:
        raise ClipkdError("serving needs FastAPI: pip install 'clipkd[search]'") from None

    if not isinstance(index, SearchIndex):
        index = SearchIndex(index, images)
    index.check_images()
    svc = SearchService(index, max_k=max_k, batch=batch, public_url=public_url, show_paths=show_paths)
    app = FastAPI(title="clipkd search", version="1",
                  description=f"Image search over {len(index)} images embedded by {index.identity}.")
    app.state.service = svc
    metrics = Metrics()
    metrics.served(svc.index)
    app.state.metrics = metrics
    app.state.reloader = reloader = Reloader(app, reload_s)
    updates = threading.Lock()  # one HTTP update at a time in this process (the index lock guards the rest)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        metrics.observe(request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    def _authorised(request: Request) -> None:
        """Index-changing routes: refused unless the server was given a token and the request carries it."""
        import hmac

        if token is None:
            raise QueryError(403, "updates over HTTP are off: start serve with --token-file FILE (or CLIPKD_TOKEN) "
                                  "to allow them")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise QueryError(401, "this route changes the index: send 'Authorization: Bearer <token>'")

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, without the input it echoes back (a client's bytes are not repeated to it)."""
        return JSONResponse({"detail": _validation_message(exc.errors())}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is served (``generation``: the index generation being answered from)."""
        ix = app.state.service.index
        return {"status": "ok", "images": len(ix), "model": ix.identity, "text": ix.encoder.has_text,
                "kind": ix.info["kind"], "runtime": ix.encoder.runtime, "generation": ix.generation,
                "worker": os.getpid()}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        """Prometheus metrics: requests and latency by route and status, index rows and generation, reloads."""
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    async def _read_limited(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_UPLOAD + (1 << 16):
            raise QueryError(413, f"body larger than {MAX_UPLOAD} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD + (1 << 16):
                raise QueryError(413, f"body larger than {MAX_UPLOAD} bytes")
        return body

    @app.post("/search")
    async def search(request: Request) -> JSONResponse:
        """Multipart (``image`` file, optional ``k``, ``label``) or JSON (``text`` | ``image`` base64 | ``id``,
        ``k``, ``label``, ``where``: ``{"column": "value"}`` over an image list's other columns)."""
        from starlette.concurrency import run_in_threadpool

        svc = app.state.service  # one generation for the whole request
        ctype = request.headers.get("content-type", "")
        body = await _read_limited(request)
        if ctype.startswith("multipart/form-data"):
            form = await _parse_form(body, ctype)
            k = svc.check_k(form.get("k", 10))
            label = form.get("label")
            allowed = svc.filter(label.decode() if isinstance(label, bytes) else label)
            if "image" in form and isinstance(form["image"], bytes):
                img = decode_image(form["image"])
                results = await run_in_threadpool(svc.by_image, img, k, allowed)
            elif form.get("text"):
                results = await run_in_threadpool(svc.by_text, form["text"], k, allowed)
            else:
                raise QueryError(400, "send an 'image' file or a 'text' field")
        else:
            import json

            try:
                data = json.loads(body or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise QueryError(400, "the body is neither multipart nor JSON") from None
            results, k = await run_in_threadpool(svc.by_json, data)
        return JSONResponse({"results": [svc.public(r) for r in results], "k": k,
                             "generation": svc.index.generation})

    @app.get("/images/{row}")
    def image(row: str, thumb: int = 0) -> Response:
        """An indexed image by id, always as JPEG or PNG (what clients and the seed's downloader save): JPEG and PNG
        files as they are, other formats (WebP, BMP, GIF, TIFF, TSV rows) re-encoded as PNG; ``?thumb=1``: a JPEG
        at most 256 px."""
        svc = app.state.service
        index = svc.index
        r = svc.image_row(row)
        path = index.image_path(r)
        if not thumb and path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            return FileResponse(path, media_type="image/png" if path.suffix.lower() == ".png" else "image/jpeg")
        try:
            img = index.open_image(r)
        except Exception:  # noqa: BLE001 - gone or undecodable since it was indexed
            raise QueryError(404, "image cannot be decoded") from None
        buf = io.BytesIO()
        if thumb:
            img.thumbnail((256, 256))
            img.save(buf, "JPEG", quality=85)
            return Response(buf.getvalue(), media_type="image/jpeg")
        img.save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/indices-list")
    def indices_list() -> list[str]:
        """clip-retrieval's list of index names (one here)."""
        return [app.state.service.index.root.name]

    @app.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        """clip-retrieval's protocol: ``{text | image (base64) | embedding_input, modality, num_images, ...}``
        → ``[{url, id, similarity, caption}]`` (``url`` absolute, pointing at ``/images/{id}``). ``num_result_ids``
        candidates are fetched (at least ``num_images``), ``deduplicate`` (default true) drops near-copies as
        clip-retrieval does, then ``num_images`` are returned; safety, violence and aesthetic fields are accepted
        and named in the ``X-Clipkd-Not-Computed`` header (no such model here)."""
        from starlette.concurrency import run_in_threadpool

        svc = app.state.service
        index = svc.index
        body = await _json_body(request)
        want = svc.check_k(body.get("num_images", 40), MAX_KNN, cap=True, name="num_images")
        k = max(want, svc.check_k(body.get("num_result_ids", want), MAX_KNN, cap=True,  # candidates, then dedupe
                                  name="num_result_ids"))
        fields = knn_fields(body, index.root.name)
        if body.get("text"):
            results = await run_in_threadpool(svc.by_text, body["text"], k)
        elif body.get("image"):
            results = await run_in_threadpool(svc.by_image, decode_image(b64decode(body["image"])), k)
        elif body.get("embedding_input") is not None:
            results = await run_in_threadpool(svc.by_vector, body["embedding_input"], k)
        elif body.get("image_url"):
            raise QueryError(400, "image_url is not fetched by this server; send the image as base64 'image'")
        else:
            raise QueryError(400, "give text, image (base64) or embedding_input")
        if fields["deduplicate"]:
            results = svc.dedupe(results)
        answer = []
        for r in results[:want]:
            p = svc.public(r)
            answer.append({"url": p["url"], "id": r["id"], "similarity": r["score"], "caption": r["label"]}
                          | ({"path": p["path"]} if "path" in p else {}))
        headers = {"X-Clipkd-Index": index.root.name, "X-Clipkd-Generation": str(index.generation)}
        if fields["ignored"]:
            headers["X-Clipkd-Not-Computed"] = ",".join(fields["ignored"])
            if not svc.reported:
                svc.reported = True
                log.warning("clip-retrieval fields %s are not honoured by this server (no safety, violence or "
                            "aesthetic model; one index, %r, whatever indice_name says): results come unfiltered "
                            "from it (reported in the X-Clipkd-Not-Computed header)", fields["ignored"],
                            index.root.name)
        return JSONResponse(answer, headers=headers)

    def _update(change) -> dict[str, Any]:
        """Run an index change (under this process's update lock and the index's own), then swap to it."""
        with updates:
            try:
                n = change()
            except ClipkdError as e:
                raise QueryError(409 if "in use by another" in str(e) else 400,
                                 _without_root(str(e), index.root)) from None
            reloader.check()
        ix = app.state.service.index
        return {"changed": n, "images": len(ix), "generation": ix.generation}

    async def _json_body(request: Request) -> dict[str, Any]:
        import json

        try:
            body = json.loads(await _read_limited(request) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise QueryError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise QueryError(400, "the body must be a JSON object")
        return body

    @app.post("/index/remove")
    async def index_remove(request: Request) -> JSONResponse:
        """Remove images (``{"ids": [...]}`` as results name them, or ``{"paths": [...]}`` relative to the
        collection root) from the index; answered once this server searches the new generation. Needs the bearer
        token."""
        from starlette.concurrency import run_in_threadpool

        from .writers import remove_from_index

        _authorised(request)
        body = await _json_body(request)
        svc = app.state.service
        ix = svc.index
        ids, paths = body.get("ids"), body.get("paths")
        if (ids is None) == (paths is None) or not isinstance(ids if ids is not None else paths, list) or \
                not (ids or paths):
            raise QueryError(400, 'give a non-empty list of "ids" or of "paths"')
        if ids is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise QueryError(400, "ids must be whole numbers")
            gone = [i for i in ids if not ix.is_live(i)]
            if gone:
                raise QueryError(404, f"image {gone[0]} was removed from this index" if svc.removed(gone[0]) else
                                 f"no indexed image with id {gone[0]}")
            keys = [ix.paths[i] for i in ids]
        else:  # the index's own keys (as --show-paths shows them), never a file of the server's resolved here
            if not all(isinstance(p, str) for p in paths):
                raise QueryError(400, "paths must be strings")
            known = set(ix.paths)
            unknown = sum(p not in known for p in paths)
            if unknown:
                raise QueryError(404, f"{unknown} of the {len(paths)} paths are not keys of this index (give them as "
                                      "the index lists them, relative to the collection root)")
            keys = paths
        return JSONResponse(await run_in_threadpool(
            _update, lambda: remove_from_index(ix.root, keys, images_root=ix.images_root)))

    @app.post("/index/add")
    async def index_add(request: Request) -> JSONResponse:
        """Embed and add images: ``{"images": "sub/folder"}`` (a folder or image list under the collection root, as
        ``clipkd index add --images`` takes). Needs the bearer token, and PyTorch on the server (a lean server
        says so: run ``clipkd index add`` where it is installed; this server picks the change up)."""
        from starlette.concurrency import run_in_threadpool

        from .writers import add_to_index

        _authorised(request)
        body = await _json_body(request)
        ix = app.state.service.index
        rel = body.get("images")
        if not isinstance(rel, str) or not rel.strip():
            raise QueryError(400, 'give "images": a folder or image list under the collection root')
        target = (ix.images_root / rel).resolve()
        if not target.is_relative_to(ix.images_root) or Path(rel).is_absolute():
            raise QueryError(400, "images must lie under the collection root (a relative path)")
        if not target.exists():
            raise QueryError(404, f"no folder or image list {rel!r} under the collection root")
        try:
            import torch  # noqa: F401 - embedding new images runs the loaders of clipkd[train]
        except ImportError:
            raise QueryError(501, "adding images needs PyTorch on this server (pip install 'clipkd[train]'); run "
                                  "`clipkd index add` where it is installed: this server picks the change up") from None

        def add() -> int:
            before = len(app.state.service.index)
            return len(add_to_index(ix.root, target, progress=False, images_root=ix.images_root)) - before

        return JSONResponse(await run_in_threadpool(_update, add))

    return app


class Reloader:
    """Swaps an app to the newest generation of its index: polls index.json (written atomically, last, by every
    change) and, when it names another generation, loads it beside the one being served and replaces the app's
    service in one assignment. Requests that started on the old one finish on it."""

    def __init__(self, app: Any, interval: float = RELOAD_S) -> None:
        self.app, self.lock = app, threading.Lock()
        self.stat = self._stat()
        self.stop = threading.Event()
        if interval > 0:
            threading.Thread(target=self._run, args=(interval,), name="clipkd-reload", daemon=True).start()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.app.state.service.index.root / "index.json")
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def check(self) -> bool:
        """Swap if index.json names a newer generation; returns whether it did."""
        from ..fileio import read_json

        with self.lock:
            stat = self._stat()
            if stat is None or stat == self.stat:
                return False
            svc = self.app.state.service
            info = read_json(svc.index.root / "index.json", "index description")
            if info.get("generation") == svc.index.generation:
                self.stat = stat
                return False
            new = svc.renewed(SearchIndex(svc.index.root, svc.index.images_root))
            self.app.state.service = new
            self.stat = stat
            self.app.state.metrics.served(new.index, reloaded=True)
            log.info("serving generation %s of %s: %d images", new.index.generation, new.index.root, len(new.index))
            return True

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - keep serving the generation we have; try again next time
                log.warning("could not load the new generation of the index (still serving the old): %s", e)


ROUTES = ("/", "/health", "/metrics", "/search", "/knn-service", "/indices-list", "/index/add", "/index/remove",
          "/docs", "/openapi.json")


class Metrics:
    """Prometheus metrics of one app (its own registry: tests build many apps in one process); with several
    uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` (set by :func:`serve`) lets any worker answer for all."""

    def __init__(self) -> None:
        try:
            import prometheus_client as pc
        except ImportError:
            raise ClipkdError("serving needs prometheus-client: pip install 'clipkd[serve]'") from None
        self.pc = pc
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("clipkd_requests", "HTTP requests by route and status", ["route", "status"],
                                   registry=r)
        self.seconds = pc.Histogram("clipkd_request_seconds", "HTTP request latency by route", ["route"], registry=r,
                                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.rows = pc.Gauge("clipkd_index_rows", "images the served index answers from", registry=r,
                             multiprocess_mode="max")
        self.generation = pc.Gauge("clipkd_index_generation", "generation of the index being served", registry=r,
                                   multiprocess_mode="max")
        self.reloads = pc.Counter("clipkd_index_reloads", "swaps to a newer generation of the index", registry=r)

    def served(self, index: SearchIndex, reloaded: bool = False) -> None:
        self.rows.set(len(index))
        self.generation.set(index.generation)
        if reloaded:
            self.reloads.inc()

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "/images/{id}" if path.startswith("/images/") else "other"
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        pc = self.pc
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = pc.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return pc.generate_latest(registry), pc.CONTENT_TYPE_LATEST
        return pc.generate_latest(self.registry), pc.CONTENT_TYPE_LATEST


async def _parse_form(body: bytes, ctype: str) -> dict[str, Any]:
    """A multipart body (already size-checked) → ``{name: bytes for files | str for fields}``."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers({"content-type": ctype}), stream(), max_part_size=MAX_UPLOAD + 1).parse()
    except MultiPartException as e:
        raise QueryError(400, f"bad multipart body: {e.message}") from None
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        out[key] = await value.read() if isinstance(value, UploadFile) else value
    return out


def read_token(token_file: str | Path | None) -> str | None:
    """The bearer token of the index-changing routes: the first line of ``token_file``, else ``CLIPKD_TOKEN``, else
    None (those routes off). An empty one is refused in one line (it would let anyone change the index)."""
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ClipkdError(f"cannot read the token file {token_file}: {type(e).__name__}: {e}") from None
        token = lines[0].strip() if lines else ""
        what = f"the token file {token_file}"
    elif os.environ.get("CLIPKD_TOKEN") is not None:
        token, what = os.environ["CLIPKD_TOKEN"].strip(), "CLIPKD_TOKEN"
    else:
        return None
    if len(token) < 16:
        raise ClipkdError(f"{what} holds a token of {len(token)} characters: give at least 16 (e.g. the output of "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


SERVE_ENV = "CLIPKD_SERVE_APP"  # the app's arguments, for the worker processes of `serve --workers N`


def app_from_env():
    """The app of one worker process of ``serve --workers N`` (uvicorn's factory; arguments from the environment)."""
    import json

    return create_app(**json.loads(os.environ[SERVE_ENV]))


def check_address(host: str, port: int) -> None:
    """Refuse, in one line and before the index and model load, a port out of range or an address this machine
    cannot listen on (taken by another server, not one of its own)."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ClipkdError(f"`port` must be from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ClipkdError(f"cannot listen on {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            why = "the address is in use (another server? pick another `port`)" if e.errno == errno.EADDRINUSE \
                else e.strerror
            raise ClipkdError(f"cannot listen on {host}:{port}: {why}") from None


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, batch: bool = True,
          public_url: str | None = None, show_paths: bool = False, images: str | Path | None = None,
          workers: int = 1, token_file: str | Path | None = None, reload_s: float = RELOAD_S) -> None:
    """Run the app with uvicorn until interrupted. ``public_url``: where clients reach it, for the result URLs
    (default: the listening address; this machine's name when listening on every interface). ``workers``: server
    processes (each loads the index and model, and swaps generations on its own). ``token_file``: the bearer token
    that ``/index/add`` and ``/index/remove`` require (default ``CLIPKD_TOKEN``; neither: those routes are off)."""
    import json
    import tempfile

    try:
        import uvicorn
    except ImportError:
        raise ClipkdError("serving needs uvicorn: pip install 'clipkd[search]'") from None
    if public_url is None:
        import socket

        public_url = f"http://{socket.gethostname() if host in ('0.0.0.0', '::', '') else host}:{port}"
    elif not public_url.startswith(("http://", "https://")):
        raise ClipkdError(f"`public_url` must start with http:// or https://, got {public_url!r}")
    if workers < 1:
        raise ClipkdError(f"`workers` must be at least 1, got {workers}")
    if reload_s < 0:
        raise ClipkdError(f"`reload_s` must be 0 (never) or more seconds, got {reload_s}")
    check_address(host, port)
    kwargs = {"batch": batch, "public_url": public_url, "show_paths": show_paths, "token": read_token(token_file),
              "reload_s": reload_s, "images": None if images is None else str(Path(images).resolve())}
    app = create_app(index_dir, **kwargs)  # checked here, once, before any worker starts
    log.info("serving %s on http://%s:%d with %s%s (web page at /, API docs at /docs, metrics at /metrics)",
             index_dir, host, port,
             "ONNX Runtime, no PyTorch" if app.state.service.index.encoder.runtime == "onnx" else "PyTorch",
             f", {workers} workers" if workers > 1 else "")
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    app.state.reloader.stop.set()
    del app
    with tempfile.TemporaryDirectory(prefix="clipkd-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # every worker's metrics, summed by whichever answers
        os.environ[SERVE_ENV] = json.dumps({"index": str(Path(index_dir).resolve()), **kwargs})
        uvicorn.run("clipkd.search.service:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
