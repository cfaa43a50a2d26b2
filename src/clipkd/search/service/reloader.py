"""The reloader: a server swaps to the newest generation of its index between requests."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..index import SearchIndex
from ..layout import INFO, read_info
from .heap import FrozenHeap

log = logging.getLogger("clipkd.search.service")
RELOAD_S = 1.0  # how often a server looks for a newer generation of its index (seconds)


class Reloader:
    """Swaps an app to the newest generation of its index: polls index.json (written atomically, last, by every
    change) and, when it names another generation, loads it beside the one being served and replaces the app's
    service in one assignment. Requests that started on the old one finish on it."""

    def __init__(self, app: Any, interval: float = RELOAD_S, heap: FrozenHeap | None = None) -> None:
        self.app, self.lock, self.heap = app, threading.Lock(), heap
        self.stat = self._stat()
        self.stop = threading.Event()
        if interval > 0:
            threading.Thread(target=self._run, args=(interval,), name="clipkd-reload", daemon=True).start()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.app.state.service.index.root / INFO)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def check(self) -> bool:
        """Swap if index.json names a newer generation; returns whether it did."""
        with self.lock:
            stat = self._stat()
            if stat is None or stat == self.stat:
                return False
            svc = self.app.state.service
            info = read_info(svc.index.root, check=False)
            if info.get("generation") == svc.index.generation:
                self.stat = stat
                return False
            new = svc.renewed(SearchIndex(svc.index.root, svc.index.images_root))
            self.app.state.service = new
            if self.heap is not None:
                self.heap.thaw()  # the old generation goes back to the collector, to be freed when its requests end
            self.stat = stat
            self.app.state.metrics.served(new.index, reloaded=True)
            log.info("serving generation %s of %s: %d images", new.index.generation, new.index.root, len(new.index))
            return True

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.check()
                if self.heap is not None:
                    self.heap.tick()
            except Exception as e:  # noqa: BLE001 - keep serving the generation we have; try again next time
                log.warning("could not load the new generation of the index (still serving the old): %s", e)
