"""Reading a store: :class:`EmbeddingStore` (the manifest, shards memory-mapped or read with ``pread``, keys, sizes
and fingerprints checked against the files, damage found and repaired) and its lazy :class:`Keys`."""


from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock

from ..data.tars import changed_files
from ..errors import ClipkdError, first_line
from ..fileio import read_json, relative, write_json

if TYPE_CHECKING:
    pass
from .targets import StoreTargets, TargetRows

STORE_FORMAT = "clipkd-store/1"
MERGE_LOCK = ".clipkd.manifest.lock"

log = logging.getLogger("clipkd.store")


class EmbeddingStore:
    """Read access to a store folder written by :func:`embed_images`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise ClipkdError(f"not an embedding store (no manifest.json): {self.root}")
        self.manifest: dict[str, Any] = read_json(manifest, "store manifest")
        if self.manifest.get("format") != STORE_FORMAT:
            raise ClipkdError(f"{manifest} is not a {STORE_FORMAT} manifest")
        self._paths: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._emb: np.ndarray | None = None
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()  # shard number -> its rows, memory-mapped
        self._fds: OrderedDict[int, tuple[int, int]] = OrderedDict()  # shard number -> (open file, rows' offset)

    @property
    def teacher(self) -> str:
        return self.manifest["teacher"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def damaged(self, shard: dict[str, Any]) -> str | None:
        """Why one shard of the manifest cannot be read (a file gone, truncated or of the wrong shape), or None."""
        try:
            lines = (self.root / shard["paths"]).read_text(encoding="utf-8").splitlines()
            arr = np.load(self.root / shard["file"], mmap_mode="r")
            sizes = np.load(self.root / shard["sizes"]) if "sizes" in shard else None
            prints = np.load(self.root / shard["prints"]) if "prints" in shard else None
        except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
            return first_line(e, 160)
        if len(lines) != shard["count"] or arr.shape != (shard["count"], self.embed_dim) or (
                sizes is not None and len(sizes) != shard["count"]) or (
                prints is not None and len(prints) != shard["count"]):
            return f"{shard['file']} and its lists disagree with the manifest's {shard['count']} rows"
        return None

    def _damage_error(self, shard: dict[str, Any], why: str) -> ClipkdError:
        return ClipkdError(f"store {self.root} is damaged: shard {Path(shard['file']).stem}: {why}; re-run the "
                           "embed-images that made it (same teacher, same images, same `out`) to embed that shard's "
                           "images again")

    def repair(self) -> int:
        """Drop the damaged shards from the manifest (under its lock), so that the next embedding pass embeds their
        images again; returns how many rows went with them."""
        with FileLock(self.root / MERGE_LOCK):
            self.manifest = read_json(self.root / "manifest.json", "store manifest")
            bad = [(s, why) for s in self.manifest["shards"] if (why := self.damaged(s)) is not None]
            if not bad:
                return 0
            lost = sum(s["count"] for s, _ in bad)
            for s, why in bad:
                log.warning("store %s: %s is damaged (%s): its %d image(s) are embedded again", self.root, s["file"],
                            why, s["count"])
            self.manifest["shards"] = [s for s in self.manifest["shards"] if all(s is not b for b, _ in bad)]
            self.manifest["count"] -= lost
            write_json(self.root / "manifest.json", self.manifest)
            for s, _ in bad:  # what is left of them, no longer listed
                for key in ("file", "paths", "sizes", "prints"):
                    if key in s:
                        (self.root / s[key]).unlink(missing_ok=True)
        self._paths = self._index = self._emb = None
        self._maps.clear()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.__dict__.pop("offsets", None)
        self.__dict__.pop("_keys", None)
        return lost

    @property
    def paths(self) -> list[str]:
        """Relative image paths, in row order."""
        if self._paths is None:
            paths: list[str] = []
            for number in range(len(self.manifest["shards"])):
                paths.extend(self.shard_keys(number))
            self._paths = paths
        return self._paths

    def _shards(self) -> list[np.ndarray]:
        """Every shard memory-mapped, each checked against the manifest."""
        return [self.shard(i) for i in range(len(self.manifest["shards"]))]

    def embeddings(self) -> np.ndarray:
        """All rows as one (N, D) float16 array, in memory (an index needs them all; trainers read
        :meth:`rows_of` on demand instead)."""
        if self._emb is None:
            parts = self._shards()
            self._emb = np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float16)
        return self._emb

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """Row number of each shard's first row, and the row count last (``len(shards) + 1`` values)."""
        return np.cumsum([0, *(int(s["count"]) for s in self.manifest["shards"])]).astype(np.int64)

    def shard(self, number: int) -> np.ndarray:
        """Shard ``number``'s rows, memory-mapped and checked against the manifest (a few hundred kept open)."""
        arr = self._maps.get(number)
        if arr is not None:
            self._maps.move_to_end(number)
            return arr
        shard = self.manifest["shards"][number]
        try:
            arr = np.load(self.root / shard["file"], mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise self._damage_error(shard, first_line(e, 160)) from None
        if arr.shape != (shard["count"], self.embed_dim):
            raise ClipkdError(f"store {self.root}: {shard['file']} has shape {arr.shape}, "
                              f"expected ({shard['count']}, {self.embed_dim})")
        self._maps[number] = arr
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return arr

    def _file(self, number: int) -> tuple[int, int]:
        """Shard ``number``'s open file descriptor and the byte offset of its rows (its header checked against the
        manifest); a few hundred kept open."""
        got = self._fds.get(number)
        if got is not None:
            self._fds.move_to_end(number)
            return got
        shard = self.manifest["shards"][number]
        path = self.root / shard["file"]
        try:
            with path.open("rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
            size = path.stat().st_size
        except (OSError, ValueError, EOFError) as e:
            raise self._damage_error(shard, first_line(e, 160)) from None
        if shape != (shard["count"], self.embed_dim) or fortran or dtype != np.float16 or \
                size < offset + shard["count"] * self.embed_dim * 2:
            raise ClipkdError(f"store {self.root}: {shard['file']} has shape {shape} ({dtype}, {size} bytes), "
                              f"expected ({shard['count']}, {self.embed_dim}) float16")
        fd = os.open(path, os.O_RDONLY)
        self._fds[number] = (fd, offset)
        if len(self._fds) > OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1][0])
        return fd, offset

    def prefetch(self) -> int:
        """Ask the kernel to read every shard into the page cache ahead of use (``POSIX_FADV_WILLNEED``: it reads in
        the background, as memory allows, and nothing enters this process's memory): a server re-ranking from the
        store then reads cached pages instead of waiting on the disk for each candidate. Returns the bytes asked
        for (0 where the system has no ``posix_fadvise``)."""
        if not hasattr(os, "posix_fadvise"):
            return 0
        asked = 0
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # a damaged store is reported where its rows are read
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                asked += os.fstat(fd).st_size
            finally:
                os.close(fd)
        return asked

    def __del__(self) -> None:
        for fd, _ in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` as a (len(rows), D) float16 array, read from the shards' files (``pread``: a span of a shard
        at once where the rows are dense in it, else row by row; nothing memory-mapped, so a server re-ranking
        candidates or a build streaming ten million rows does not grow its resident memory with the store)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._emb is not None:
            return self._emb[rows]
        d = self.embed_dim
        out = np.empty((len(rows), d), np.float16)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"store {self.root} has {len(self)} rows; asked for row {int(rows.max())}")
        row_bytes = d * 2
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            local = rows[at] - self.offsets[s]
            fd, offset = self._file(int(s))
            lo, hi = int(local.min()), int(local.max()) + 1
            if hi - lo <= 4 * len(at) + 64:  # dense: one read of the span
                buf = os.pread(fd, (hi - lo) * row_bytes, offset + lo * row_bytes)
                out[at] = np.frombuffer(buf, np.float16).reshape(hi - lo, d)[local - lo]
            else:  # row by row, joined once (a re-rank's 1,280 candidates: little Python per row)
                reads = [os.pread(fd, row_bytes, offset + r * row_bytes) for r in local.tolist()]
                out[at] = np.frombuffer(b"".join(reads), np.float16).reshape(len(at), d)
        return out

    def chunks(self, rows: np.ndarray | None = None, size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, float32 vectors)`` in order, ``size`` rows at a time (every row, or the sorted ``rows``), read
        from the files: memory stays flat in the number of rows."""
        if rows is None:
            rows = np.arange(len(self), dtype=np.int64)
        for start in range(0, len(rows), size):
            part = np.asarray(rows[start:start + size], dtype=np.int64)
            yield part, self.gather(part).astype(np.float32)

    def keys(self) -> Keys:
        """The row keys (relative paths), read a shard at a time as rows are asked for: no Python string per row
        is held (what a server of ten million rows needs); :attr:`paths` is the list, for writers and trainers."""
        if "_keys" not in self.__dict__:
            self.__dict__["_keys"] = Keys(self) if self._paths is None else self._paths
        return self.__dict__["_keys"]

    def shard_keys(self, number: int) -> list[str]:
        """The keys of shard ``number``, checked against the manifest."""
        shard = self.manifest["shards"][number]
        try:
            lines = (self.root / shard["paths"]).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise self._damage_error(shard, first_line(e, 160)) from None
        if len(lines) != shard["count"]:
            raise ClipkdError(f"store {self.root}: {shard['paths']} lists {len(lines)} paths, "
                              f"manifest says {shard['count']}")
        return lines

    def shard_line_ends(self, number: int) -> np.ndarray:
        """Where each key of shard ``number`` ends in its path list (byte offsets, int64), checked against the
        manifest: one key is then read without the others (:meth:`shard_key`)."""
        shard = self.manifest["shards"][number]
        try:
            data = (self.root / shard["paths"]).read_bytes()
        except OSError as e:
            raise self._damage_error(shard, first_line(e, 160)) from None
        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
        if data and not data.endswith(b"\n"):
            ends = np.append(ends, len(data))
        if len(ends) != shard["count"]:
            raise ClipkdError(f"store {self.root}: {shard['paths']} lists {len(ends)} paths, "
                              f"manifest says {shard['count']}")
        return ends

    def shard_key(self, number: int, ends: np.ndarray, local: int) -> str:
        """Key ``local`` of shard ``number``, read alone from its path list (``ends``: :meth:`shard_line_ends`)."""
        start = int(ends[local - 1]) + 1 if local else 0
        shard = self.manifest["shards"][number]
        try:
            with (self.root / shard["paths"]).open("rb") as f:
                f.seek(start)
                return f.read(int(ends[local]) - start).decode("utf-8").rstrip("\r")
        except (OSError, UnicodeDecodeError) as e:
            raise self._damage_error(shard, first_line(e, 160)) from None

    def sizes(self) -> np.ndarray:
        """Byte size of each row's file when it was embedded (-1: not a file; -2: an older store did not record it)."""
        return self._per_row("sizes")

    def prints(self) -> np.ndarray:
        """Content fingerprint of each row's file when it was embedded (-1: not a file; -2: not recorded)."""
        return self._per_row("prints")

    def _per_row(self, key: str) -> np.ndarray:
        """One int64 per row from each shard's ``key`` file (-2 for shards written before it was recorded)."""
        parts = []
        for shard in self.manifest["shards"]:
            if key not in shard:
                parts.append(np.full(shard["count"], -2, np.int64))
                continue
            try:
                parts.append(np.load(self.root / shard[key]).astype(np.int64))
            except (OSError, ValueError, EOFError) as e:
                raise self._damage_error(shard, first_line(e, 160)) from None
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def check_files(self, root: str | Path, paths: Sequence[str], rows: np.ndarray, fingerprint=None) -> None:
        """Refuse when the files ``root/paths`` (with store rows ``rows``) are not the files the store embedded.

        Compared by byte size, then by content fingerprint on up to :data:`~clipkd.data.tars.CHECKED_PRINTS` rows
        spread over the images (sizes cannot tell apart BMP, PPM or raw TIFF files of one size); a store moved or
        copied with its images passes, a store of ``train/`` used for ``test/`` (same relative names, other pictures)
        does not. ``fingerprint(path)``: the fingerprint of keys that are not files (a Chinese-CLIP TSV's rows).
        """
        root = Path(root)
        have = np.flatnonzero(rows >= 0)
        recorded = self.sizes()[rows[have]] if len(have) else np.zeros(0, np.int64)
        known = recorded != -2  # -2: an older store recorded no size; -1: not a file (a TSV row)
        if not known.all() and self.images_root() != root.resolve():
            raise ClipkdError(f"store {self.root} was built from {self.images_root()} by an older "
                              f"clipkd that did not record file sizes, so it cannot be checked against {root}; "
                              "re-run embed-images into a new `out`")
        bad = []
        for i, size in zip(have[known].tolist(), recorded[known].tolist(), strict=True):
            if size < 0:  # not a file (a TSV row): nothing to compare
                continue
            try:
                now = os.stat(root / paths[i]).st_size
            except OSError:
                now = -1
            if now != size:
                bad.append(paths[i])
        what = "size"
        if not bad and len(have):
            bad = changed_files(root, [paths[i] for i in have.tolist()], self.prints()[rows[have]].tolist(),
                                fingerprint)
            what = "content"
        if bad:
            raise ClipkdError(
                f"store {self.root} holds embeddings of other files: {len(bad)} of the {len(have)} images under "
                f"{root} it has rows for differ in {what} from the files it embedded (from "
                f"{self.images_root()}), e.g. {bad[:3]}; use the store of these images, or "
                "embed-images them into a new `out`")

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Row numbers of ``paths``; -1 where the store has no embedding for a path."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths)}
        return np.array([self._index.get(p, -1) for p in paths], dtype=np.int64)

    def targets(self, paths: Sequence[str], teacher: str | None = None, what: str = "training images",
                root: str | Path | None = None, fingerprint=None) -> StoreTargets:
        """Teacher embeddings of ``paths`` (the one lookup every trainer uses), with one policy for missing rows.

        Images the store skipped as undecodable are left out and counted (a logged warning); an image the
        store has never seen is an error naming how many and which, since training without its target would
        silently change the data set. ``teacher``: the identity the embeddings must come from. ``root``: the
        folder ``paths`` are relative to; its files must be the ones the store embedded (:meth:`check_files`;
        ``fingerprint``: for keys that are not files).
        """
        if teacher is not None:
            self.check_teacher(teacher)
        rows = self.rows(paths)
        if root is not None and (rows < 0).any():  # the same images named from elsewhere (a list of absolute
            base = self.images_root()             # paths for an index's store, keyed under its collection root)
            alt = self.rows([relative(Path(root) / p, base) for p in paths])
            rows = np.where(rows < 0, alt, rows)
        if root is not None:
            self.check_files(root, paths, rows, fingerprint)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            failed = {s["path"] for s in self.manifest["skipped"]}
            unknown = [int(i) for i in missing if paths[i] not in failed]
            if unknown:
                raise ClipkdError(
                    f"store {self.root} has no embedding for {len(unknown)} of the {len(paths)} {what} (e.g. "
                    f"{[paths[i] for i in unknown[:3]]}); run embed-images on them (was the store built from "
                    "another folder?)")
            log.warning("%d of %d %s could not be decoded when the store was built; left out", len(missing),
                        len(paths), what)
        keep = np.flatnonzero(rows >= 0)
        return StoreTargets(self.rows_of(rows[keep]), keep, [paths[i] for i in missing])

    def rows_of(self, rows: np.ndarray) -> TargetRows:
        """Store rows ``rows``, read on demand from the memory-mapped shards."""
        self._shards()
        files = [(str((self.root / s["file"]).resolve()), s["count"]) for s in self.manifest["shards"]]
        return TargetRows(files, self.embed_dim, rows)

    def images_root(self) -> Path:
        """The folder the store's rows were embedded from (recorded relative to the store; absolute in stores of
        clipkd before 0.1's portable stores)."""
        return (self.root / self.manifest.get("images_root", "/")).resolve()

    def check_teacher(self, identity: str, hint: str = "") -> None:
        """Refuse to mix embeddings of two teachers."""
        if identity != self.teacher:
            raise ClipkdError(f"store {self.root} holds embeddings of teacher '{self.teacher}', not '{identity}'"
                              + (f"; {hint}" if hint else ""))


OPEN_SHARDS = 256  # shards kept memory-mapped at once (each holds a file descriptor)


class Keys(Sequence):
    """A store's row keys, read from its shards' path lists as rows are asked for: indexing, ``len``, iteration and
    ``in`` as a list, without a Python string per row held: indexing and slices read whole path lists (the last
    :data:`CACHED` kept), as scans want; :meth:`one` reads one key alone through its shard's line ends (8 bytes a
    row, kept for :data:`ENDS_CACHED` shards), as a search result wants."""

    CACHED = 32
    ENDS_CACHED = 1024  # 64 M rows' line ends at most (512 MB); at 10M rows, 80 MB

    def __init__(self, store: EmbeddingStore) -> None:
        self.store, self.offsets = store, store.offsets
        self._lines: OrderedDict[int, list[str]] = OrderedDict()
        self._ends: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, number: int) -> list[str]:
        lines = self._lines.get(number)
        if lines is None:
            lines = self._lines[number] = self.store.shard_keys(number)
            if len(self._lines) > self.CACHED:
                self._lines.popitem(last=False)
        else:
            self._lines.move_to_end(number)
        return lines

    def __getitem__(self, row):  # noqa: ANN001 - an int or a slice, as a list's
        if isinstance(row, slice):  # whole path lists, a shard at a time
            out = []
            for i in range(*row.indices(len(self))):
                n = int(np.searchsorted(self.offsets, i, side="right")) - 1
                out.append(self._shard(n)[i - int(self.offsets[n])])
            return out
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(row)
        number = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self._shard(number)[row - int(self.offsets[number])]

    def one(self, row: int) -> str:
        """Key ``row`` read alone (a search result's): from its shard's list when that is cached, else through the
        shard's line ends, without splitting its other keys into strings. Scans index the sequence instead."""
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(row)
        number = int(np.searchsorted(self.offsets, row, side="right")) - 1
        local = row - int(self.offsets[number])
        lines = self._lines.get(number)
        if lines is not None:
            return lines[local]
        ends = self._ends.get(number)
        if ends is None:
            ends = self._ends[number] = self.store.shard_line_ends(number)
            if len(self._ends) > self.ENDS_CACHED:
                self._ends.popitem(last=False)
        return self.store.shard_key(number, ends, local)

    def __iter__(self) -> Iterator[str]:
        for number in range(len(self.offsets) - 1):
            yield from self.store.shard_keys(number)
