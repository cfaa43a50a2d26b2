"""Writing a store: the manifest of a new one, :class:`ShardWriter` (atomic shards, the manifest merged under a lock,
so ranks of one job and a re-run after a kill never lose or duplicate a row), and reopening one to append."""


from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from ..errors import ClipkdError
from ..fileio import read_json, relative, write_json, write_npy, write_text

if TYPE_CHECKING:
    pass
from .reader import MERGE_LOCK, STORE_FORMAT, EmbeddingStore

log = logging.getLogger("clipkd.store")


def new_manifest(info: dict[str, Any], images_root: Path, shard_size: int, out: Path) -> dict[str, Any]:
    """A new store's manifest; the images' root is recorded relative to the store, which moves with them."""
    root = relative(images_root, out)
    return {"format": STORE_FORMAT, "teacher": info["teacher"], "embed_dim": info["embed_dim"],
            "preprocess": info["preprocess"], "normalized": "l2", "dtype": "float16",
            "images_root": root, "images_roots": [root],
            "shard_size": shard_size, "count": 0,
            "skipped_count": 0, "skipped": [], "shards": [], "seconds": 0.0}


class ShardWriter:
    """Appends rows to a store: buffers up to ``shard_size`` rows, then writes the shard atomically and only then
    the manifest naming it (so a killed job loses at most the shard in progress).

    The manifest is merged, not overwritten: under a short lock (``.clipkd.manifest.lock``) the writer re-reads
    it, drops the rows another writer (a rank of the same job) has added meanwhile, names its shard after the
    shards listed and writes the manifest back. ``done``: the paths the manifest held when the writer started.
    """

    def __init__(self, out: Path, manifest: dict[str, Any], shard_size: int, done: set[str] | None = None) -> None:
        self.out, self.manifest, self.shard_size = out, manifest, shard_size
        self.done = set(done or ())
        self.seen = {s["file"] for s in manifest["shards"]}
        self.emb: list[np.ndarray] = []
        self.paths: list[str] = []
        self.sizes: list[int] = []
        self.prints: list[int] = []
        self.skipped: list[dict[str, str]] = []
        self.t0 = time.perf_counter()

    @property
    def skipped_count(self) -> int:
        return self.manifest["skipped_count"] + len(self.skipped)

    def add(self, emb: np.ndarray, paths: Sequence[str], sizes: Sequence[int],
            prints: Sequence[int] | None = None) -> None:
        self.emb.append(np.asarray(emb, dtype=np.float16))
        self.paths.extend(paths)
        self.sizes.extend(sizes)
        self.prints.extend(prints if prints is not None else [-2] * len(paths))
        self._maybe_flush()

    def skip(self, path: str, error: str) -> None:
        self.skipped.append({"path": path, "error": error})
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.paths) + len(self.skipped) >= self.shard_size:
            self.flush()

    def _current(self) -> dict[str, Any]:
        """The manifest on disk (another writer may have extended it), or ours while none is written."""
        path = self.out / "manifest.json"
        if not path.is_file():
            return self.manifest
        m = read_json(path, "store manifest")
        if m.get("teacher") != self.manifest["teacher"] or m.get("embed_dim") != self.manifest["embed_dim"]:
            raise ClipkdError(f"store {self.out} was started by another teacher ({m.get('teacher')}) meanwhile")
        for root in self.manifest.get("images_roots", []):
            if root not in m.setdefault("images_roots", []):
                m["images_roots"].append(root)
        for shard in m["shards"]:  # rows other writers added since we last looked
            if shard["file"] not in self.seen:
                self.seen.add(shard["file"])
                self.done.update((self.out / shard["paths"]).read_text(encoding="utf-8").splitlines())
        self.done.update(s["path"] for s in m["skipped"])
        return m

    def flush(self, final: bool = False) -> None:
        """Write the buffered rows as a shard and merge it into the manifest; ``final``: also write the manifest of
        a store that got no row (so it can be opened)."""
        if not (self.paths or self.skipped or (final and not (self.out / "manifest.json").is_file())):
            return
        emb = np.concatenate(self.emb) if self.emb else np.zeros((0, self.manifest["embed_dim"]), np.float16)
        with FileLock(self.out / MERGE_LOCK):
            m = self._current()
            fresh = [i for i, p in enumerate(self.paths) if p not in self.done]
            if len(fresh) < len(self.paths):
                log.info("%d row(s) were embedded by another writer meanwhile; dropped", len(self.paths) - len(fresh))
            paths, sizes, emb = [self.paths[i] for i in fresh], [self.sizes[i] for i in fresh], emb[fresh]
            prints = [self.prints[i] for i in fresh]
            skipped = [s for s in self.skipped if s["path"] not in self.done]
            if paths or skipped:
                # after the highest listed shard (a repaired store has gaps); an unlisted file there is at most the
                # leftover of a killed writer
                name = f"shard-{1 + max((_shard_number(s['file']) for s in m['shards']), default=-1):05d}"
                files = [self.out / f"{name}{ext}" for ext in (".txt", ".npy", ".size.npy", ".fp.npy")]
                try:
                    write_text(files[0], "".join(p + "\n" for p in paths))
                    write_npy(files[1], emb)
                    write_npy(files[2], np.asarray(sizes, dtype=np.int64))
                    write_npy(files[3], np.asarray(prints, dtype=np.int64))
                except BaseException:  # a shard not in the manifest is not left behind (a full disk, a kill)
                    for f in files:
                        f.unlink(missing_ok=True)
                    raise
                m["shards"].append({"file": f"{name}.npy", "paths": f"{name}.txt", "sizes": f"{name}.size.npy",
                                    "prints": f"{name}.fp.npy", "count": len(paths)})
                self.seen.add(f"{name}.npy")
                m["count"] += len(paths)
                m["skipped"].extend(skipped)
                m["skipped_count"] = len(m["skipped"])
            now = time.perf_counter()
            m["seconds"] = round(m["seconds"] + now - self.t0, 3)
            self.t0 = now
            write_json(self.out / "manifest.json", m)
            self.done.update(paths)
            self.done.update(s["path"] for s in skipped)
        self.manifest = m
        self.emb, self.paths, self.sizes, self.prints, self.skipped = [], [], [], [], []


def _shard_number(name: str) -> int:
    digits = "".join(c for c in Path(name).name.split(".")[0] if c.isdigit())
    return int(digits) if digits else -1


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def open_for_append(info: dict[str, Any], images: Path, out: Path, shard_size: int, files: Sequence[str],
                     fingerprint=None):
    """The manifest to extend (checking the teacher, and that rows named like ``files`` are of these files)
    and the paths already done (embedded or skipped)."""
    if (out / "manifest.json").exists():
        store = EmbeddingStore(out)
        store.check_teacher(info["teacher"], hint="use another `out` folder")
        store.repair()  # a damaged shard's images are embedded again
        store.check_files(images, files, store.rows(files), fingerprint)
        root = relative(images, out)
        roots = store.manifest.setdefault("images_roots", [store.manifest.get("images_root", root)])
        if root not in roots:
            roots.append(root)
        return store.manifest, set(store.paths) | {s["path"] for s in store.manifest["skipped"]}
    return new_manifest(info, images, shard_size, out), set()
