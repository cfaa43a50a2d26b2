"""``clipkd serve``: an index behind HTTP (FastAPI): JSON search, images, a web page, and clip-retrieval's
``/knn-service`` protocol.

The rooms: :mod:`.requests` (what a request brings, checked), :mod:`.core` (:class:`SearchService`, the query
handling without FastAPI), :mod:`.batcher` (image queries of concurrent requests embedded and searched together),
:mod:`.reloader` (swapping to a newer generation), :mod:`.metrics` (Prometheus), :mod:`.routes` (one router per
concern, the token check a dependency) and :mod:`.app` (``create_app`` and ``serve``).
"""

from .app import SERVE_ENV, app_from_env, check_address, create_app, read_token, serve
from .batcher import Batcher
from .core import (
           DEDUP_COSINE,
           MAX_K,
           MAX_KNN,
           NOT_COMPUTED,
           TEXT_CACHE,
           SearchService,
           _common_root,
           _relative,
           knn_fields,
)
from .metrics import ROUTES, Metrics
from .reloader import RELOAD_S, Reloader
from .requests import MAX_PIXELS, MAX_UPLOAD, QueryError, b64decode, decode_image

__all__ = ["SERVE_ENV", "app_from_env", "check_address", "create_app", "read_token", "serve", "Batcher",
           "DEDUP_COSINE", "MAX_K", "MAX_KNN", "NOT_COMPUTED", "TEXT_CACHE", "SearchService", "_common_root",
           "_relative", "knn_fields", "ROUTES", "Metrics", "RELOAD_S", "Reloader", "MAX_PIXELS", "MAX_UPLOAD",
           "QueryError", "b64decode", "decode_image"]
