"""The app's Prometheus metrics: requests and latency by route, the served index, and where a query's time goes
(the batcher's queue and batch sizes, the text cache)."""

from __future__ import annotations

import os

from ...errors import ClipkdError
from ..index import SearchIndex

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
        self.batch = pc.Histogram("clipkd_batch_size", "image queries embedded and searched in one batch", registry=r,
                                  buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue = pc.Gauge("clipkd_queue_depth", "image queries left waiting when the last batch started",
                              registry=r, multiprocess_mode="livesum")
        self.cache = pc.Counter("clipkd_text_cache", "text queries answered from the query-embedding cache (hit) or "
                                "by the text tower (miss)", ["result"], registry=r)

    def served(self, index: SearchIndex, reloaded: bool = False) -> None:
        self.rows.set(len(index))
        self.generation.set(index.generation)
        if reloaded:
            self.reloads.inc()

    def batched(self, size: int, depth: int) -> None:
        """One batch of ``size`` image queries ran; ``depth`` others were waiting behind it."""
        self.batch.observe(size)
        self.queue.set(depth)

    def cache_result(self, hit: bool) -> None:
        """A text query was answered from the cache (``hit``) or by the text tower."""
        self.cache.labels("hit" if hit else "miss").inc()

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
