"""What a server loaded, kept out of the garbage collector's full passes (``gc.freeze``), and given back to it at
each generation switch so that an old generation is still freed."""

from __future__ import annotations

import gc
import threading
import time

from .core import QUERY_TIMEOUT_S
from .requests import BODY_TIMEOUT_S

GC_ENV = "CLIPKD_GC_FREEZE"  # "0": `serve` leaves Python's collector as it is (to compare; the default freezes)
# after a generation switch, how long before freezing again: past the longest a request can hold the old generation
# (its body's deadline, then its query's), so none of the old generation is frozen again and kept for ever
SETTLE_S = BODY_TIMEOUT_S + QUERY_TIMEOUT_S + 5.0


class FrozenHeap:
    """Keeps what a server process loaded (index, model, app) out of the collector's full passes: ``gc.freeze()``
    after loading moves every live object into a permanent generation that no collection walks, so the full
    collections that requests trigger now and then walk only what requests made (measured in a server process
    holding the 100k index: a full collection 12 ms unfrozen, under 1 ms frozen). Under 30 s of load no full
    collection ran in either mode, yet the frozen server's p99 was lower in five of five alternating runs
    (exploratory, docs/search.md): measured, not explained. Each freeze starts with one full collection (tens of
    ms, once at start and once per generation switch).
    Frozen objects freed by reference counting still go at once; one that dies in a reference cycle would stay
    for ever, so a generation switch unfreezes everything (the old generation is collected once its last requests
    finish) and, ``settle_s`` seconds later, collects and freezes again. Process-wide: ``serve`` turns it on; an
    app built in a test or a notebook leaves the collector alone."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.settle_s, self.lock = settle_s, threading.Lock()
        self.due: float | None = None
        self.freeze()

    def freeze(self) -> None:
        """Collect what is garbage now, then freeze every live object."""
        with self.lock:
            gc.collect()
            gc.freeze()
            self.due = None

    def thaw(self) -> None:
        """At a generation switch: every object back to the collector; frozen again ``settle_s`` seconds later."""
        with self.lock:
            gc.unfreeze()
            self.due = time.monotonic() + self.settle_s

    def tick(self) -> None:
        """Freeze again if a switch has settled (the reloader calls this on each of its polls)."""
        if self.due is not None and time.monotonic() >= self.due:
            self.freeze()
