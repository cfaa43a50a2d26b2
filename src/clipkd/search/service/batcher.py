"""The batcher: image queries from concurrent requests embedded and searched together."""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..index import SearchIndex
from .requests import QueryError

MAX_QUEUE = 512  # image queries a server lets wait for the model; more are refused at once (503, Retry-After)


class Batcher:
    """One worker thread that embeds and searches image queries in batches.

    ``submit`` returns a future; the worker takes the first waiting query plus every query already queued behind
    it (up to ``max_batch``; with ``window_s`` > 0 it also waits that long for more), runs the model once and FAISS
    once for all of them. With the default ``window_s=0`` a lone query never waits; under load the queries that
    arrived while the previous batch ran form the next one. ``batches`` holds the sizes of the last 1,000 batches;
    ``on_batch(size, waiting)`` (the app's metrics) is told of each.
    """

    def __init__(self, max_batch: int = 32, window_s: float = 0.0,
                 on_batch: Callable[[int, int], None] | None = None, max_queue: int = MAX_QUEUE) -> None:
        self.max_batch, self.window_s, self.on_batch, self.max_queue = max_batch, window_s, on_batch, max_queue
        self.queue: queue.Queue = queue.Queue()
        self.batches: collections.deque[int] = collections.deque(maxlen=1000)
        self.thread = threading.Thread(target=self._run, name="clipkd-batcher", daemon=True)
        self.thread.start()

    def depth(self) -> int:
        """Queries waiting for the model (not counting the batch being run)."""
        return self.queue.qsize()

    def submit(self, index: SearchIndex, image: Any, k: int, allowed: np.ndarray | None = None) -> Future:
        """Queue a preprocessed image for ``index`` (the generation the request holds: queries of two generations
        in one batch are searched each in its own). A full queue (:data:`MAX_QUEUE`) is a 503 at once: a burst
        is answered "busy, retry" rather than left to wait past any client's patience."""
        if self.queue.qsize() >= self.max_queue:
            raise QueryError(503, f"the server is busy ({self.max_queue} image queries waiting); try again shortly")
        fut: Future = Future()
        self.queue.put((index, image, k, allowed, fut))
        return fut

    def _take(self) -> list[tuple]:
        """The next batch: the first waiting query and those queued behind it."""
        items = [self.queue.get()]
        deadline = time.perf_counter() + self.window_s
        while len(items) < self.max_batch:
            wait = deadline - time.perf_counter()
            try:
                items.append(self.queue.get(timeout=max(wait, 0)) if wait > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return [it for it in items if not it[4].cancelled()]  # a request that gave up is not searched for

    def _run(self) -> None:
        while True:
            items = self._take()
            if not items:
                continue
            self.batches.append(len(items))  # counted before answering: a caller that sees its result sees it
            if self.on_batch is not None:
                self.on_batch(len(items), self.queue.qsize())
            try:
                run_batch(items)
            except Exception as e:  # noqa: BLE001 - hand the failure to every waiting request
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(e)


def run_batch(items: list[tuple]) -> None:
    """Embed every queued image at once (one model for every generation), then search each generation's and
    filter's queries in one call, and answer each future with its own ``k`` results."""
    q = items[0][0].encoder.encode_batch([it[1] for it in items])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (index, _, _, allowed, _) in enumerate(items):
        groups.setdefault((id(index), id(allowed)), []).append(i)
    for members in groups.values():
        index, allowed = items[members[0]][0], items[members[0]][3]
        scores, rows = index.search_vectors(q[members], max(items[i][2] for i in members), allowed)
        for j, i in enumerate(members):
            k = items[i][2]
            fut = items[i][4]
            if fut.set_running_or_notify_cancel():  # False: the request gave up meanwhile
                fut.set_result(index.hits(scores[j][:k], rows[j][:k]))
