"""The app: a :class:`SearchService` behind FastAPI's routers, and ``serve`` that runs it with uvicorn."""

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ...errors import ClipkdError
from ..index import SearchIndex
from .core import MAX_K, SearchService
from .heap import GC_ENV, FrozenHeap
from .metrics import Metrics
from .reloader import RELOAD_S, Reloader
from .requests import QueryError, validation_message

log = logging.getLogger("clipkd.search.service")


def create_app(index: SearchIndex | str | Path, batch: bool = True, max_k: int = MAX_K,
               public_url: str = "http://127.0.0.1:8000", show_paths: bool = False,
               images: str | Path | None = None, token: str | None = None, reload_s: float = RELOAD_S,
               threads: int | None = None, freeze_gc: bool = False):
    """The FastAPI app serving ``index`` (loaded with the model that built it); result URLs start with
    ``public_url`` (the address clients reach the server at), never with what a request's ``Host`` says.
    ``images``: where the collection's images are on this machine (default: where the index records them); a root
    that is not there, or lacks most of the rows, is refused in one line before serving. ``token``: the bearer
    token that ``/index/add`` and ``/index/remove`` require (None: they are off). Every ``reload_s`` seconds the
    app looks for a newer generation of the index (written by ``clipkd index add/remove/compact``) and swaps to it
    between requests (0: never). ``threads``: this process's threads for the model and FAISS (None: the libraries'
    defaults, every core). ``freeze_gc``: keep what was loaded out of the garbage collector's full passes
    (:class:`FrozenHeap`; process-wide, so ``serve`` turns it on and an app built in a notebook leaves it off)."""
    try:
        from fastapi import FastAPI
    except ImportError:
        raise ClipkdError("serving needs FastAPI: pip install 'clipkd[search]'") from None
    from ...onnxfile import set_threads
    from .routes import ROUTERS

    set_threads(threads)  # before the model's sessions open
    if not isinstance(index, SearchIndex):
        index = SearchIndex(index, images)
    index.check_images()
    svc = SearchService(index, max_k=max_k, batch=batch, public_url=public_url, show_paths=show_paths)
    set_threads(threads)  # again: a PyTorch model imported torch while it loaded
    app = FastAPI(title="clipkd search", version="1",
                  description=f"Image search over {len(index)} images embedded by {index.identity}.")
    app.state.service, app.state.token = svc, token
    app.state.metrics = metrics = Metrics()
    metrics.served(svc.index)
    if svc.batcher is not None:
        svc.batcher.on_batch = metrics.batched
    svc.on_cache = metrics.cache_result
    app.state.updates = threading.Lock()  # one HTTP update at a time in this process (the index lock guards the rest)
    for router in ROUTERS:
        app.include_router(router)
    _handle_errors(app, metrics)
    app.state.heap = FrozenHeap() if freeze_gc else None  # last: everything loaded and built is frozen
    app.state.reloader = Reloader(app, reload_s, app.state.heap)
    return app


def _handle_errors(app, metrics: Metrics) -> None:
    """Query errors as ``{"detail": message}`` with their status, FastAPI's 422 without the input it echoes, and
    every request counted and timed by route (:class:`CountRequests`)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(QueryError)
    async def _query_error(request, exc: QueryError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, without the input it echoes back (a client's bytes are not repeated to it)."""
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)


class CountRequests:
    """ASGI middleware counting and timing every request by route and status (a plain ASGI wrapper: Starlette's
    ``BaseHTTPMiddleware`` costs each request a task and a stream)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(scope["path"], status[0], time.perf_counter() - t0)


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
          workers: int = 1, token_file: str | Path | None = None, reload_s: float = RELOAD_S,
          threads: int | None = None) -> None:
    """Run the app with uvicorn until interrupted. ``public_url``: where clients reach it, for the result URLs
    (default: the listening address; this machine's name when listening on every interface). ``workers``: server
    processes (each loads the index and model, and swaps generations on its own). ``threads``: each process's
    threads for the model and FAISS (default: the cores shared out among the workers, every core with one; either
    way ONNX Runtime's threads sleep between queries instead of spinning).
    ``token_file``: the bearer token
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
    # FAISS's OpenMP threads sleep between queries as ONNX Runtime's do (set before FAISS loads; the operator's
    # own OMP_WAIT_POLICY wins, and CLIPKD_SPIN=1 keeps the libraries' spinning defaults for every thread)
    from ...onnxfile import SPIN_ENV

    if os.environ.get(SPIN_ENV) != "1":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:  # each worker its share of the cores (all of them with one), no thread spinning between
        threads = max(1, (os.cpu_count() or 1) // workers)  # queries: spinning threads measured 25 % fewer queries/s
    if reload_s < 0:
        raise ClipkdError(f"`reload_s` must be 0 (never) or more seconds, got {reload_s}")
    check_address(host, port)
    kwargs = {"batch": batch, "public_url": public_url, "show_paths": show_paths, "token": read_token(token_file),
              "reload_s": reload_s, "images": None if images is None else str(Path(images).resolve()),
              "threads": threads, "freeze_gc": os.environ.get(GC_ENV) != "0"}
    if workers == 1:
        app = create_app(index_dir, **kwargs)  # checked here, before it serves
        runtime = app.state.service.index.encoder.runtime
    else:  # checked once before any worker starts, in a process of its own: this one holds no index or model
        runtime = check_apart(index_dir, kwargs)
    log.info("serving %s on http://%s:%d with %s%s (web page at /, API docs at /docs, metrics at /metrics)",
             index_dir, host, port, "ONNX Runtime, no PyTorch" if runtime == "onnx" else "PyTorch",
             f", {workers} workers" if workers > 1 else "")
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    with tempfile.TemporaryDirectory(prefix="clipkd-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # every worker's metrics, summed by whichever answers
        os.environ[SERVE_ENV] = json.dumps({"index": str(Path(index_dir).resolve()), **kwargs})
        uvicorn.run("clipkd.search.service:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")


def check_apart(index_dir: str | Path, kwargs: dict[str, Any]) -> str:
    """Build the app of ``serve --workers N`` once in a spawned process, so that every one-line error (index, model,
    images, token) comes before a worker starts while the supervising process never holds the index or the model
    (building it here and dropping it kept the index and the model beside the workers: search-scale.json's
    10M rows, two workers 2,271 MiB PSS in all before, 1,510 after);
    returns the model's runtime (``onnx`` or ``torch``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe(duplex=False)
    level = logging.getLogger("clipkd").getEffectiveLevel()
    proc = ctx.Process(target=_build_and_report, args=(str(index_dir), kwargs, theirs, level), daemon=True)
    proc.start()
    theirs.close()
    try:
        kind, value = mine.recv()
    except EOFError:
        kind, value = "error", None
    proc.join(timeout=60)
    if kind == "error":
        raise ClipkdError(value or f"checking index {index_dir} before serving failed (exit code {proc.exitcode})")
    return value


def _build_and_report(index_dir: str, kwargs: dict[str, Any], conn: Any, level: int) -> None:
    """:func:`check_apart`'s child: build the app, send ``("ok", runtime)`` or ``("error", one line)``, exit at once
    (the app's threads are not waited for)."""
    logging.basicConfig(format="%(levelname)s %(message)s")
    logging.getLogger("clipkd").setLevel(level)
    try:
        app = create_app(index_dir, **{**kwargs, "reload_s": 0})
        conn.send(("ok", app.state.service.index.encoder.runtime))
    except ClipkdError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - relayed as one line, as the CLI shows any error
        conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
    finally:
        conn.close()
        logging.shutdown()
        os._exit(0)
