"""The embedding store: a teacher's image embeddings, computed once, in resumable fp16 shards.

Layout of a store folder::

    manifest.json          teacher identity, embed size, preprocessing, counts, shards, skipped files
    shard-00000.npy        (n, D) float16, L2-normalised rows
    shard-00000.txt        the n image paths (relative to the image root), one per line
    shard-00000.size.npy   (n,) int64 byte sizes of those files when they were embedded (ties rows to files)
    shard-00000.fp.npy     (n,) int64 content fingerprints of those files (their first and last 4 KiB hashed), for
                           files whose sizes cannot tell them apart

A shard is written (atomically) before the manifest names it, so a killed run loses at most the
shard it was filling; re-running the same command embeds only images no finished shard holds.
One command writes a store at a time (a lock; a second one gets a one-line error), except the ranks of one
job (``torchrun``/``srun``, see :mod:`clipkd.distributed`): each rank embeds the images a hash of their key gives
it and merges its shards into the manifest under a short lock, re-reading it first and dropping any row another
writer added meanwhile, so ranks may finish in any order, and a job killed part-way may be re-run with another
number of ranks, without a lost or duplicated row.

Reading is memory-mapped: :class:`TargetRows` reads the rows a trainer asks for from the shards on demand, so
a store far larger than memory can feed training, and each loader worker or rank maps the files itself.

Rows are keyed by relative path, so a store also records each file's size: a store used with another
folder whose files share the relative names (``train/`` vs ``test/``) is refused. Sizes, not content
hashes: a ``stat`` per file costs microseconds where hashing reads every byte again; and not mtimes, which
a plain copy of the folder changes.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from .data.folders import list_images
from .data.tars import changed_files, content_fingerprint
from .distributed import check_peers, my_share, ranks
from .errors import ClipkdError, first_line
from .fileio import check_can_create, check_out_dir, exclusive, read_json, relative, write_json, write_npy, write_text

if TYPE_CHECKING:
    import torch

STORE_FORMAT = "clipkd-store/1"
MERGE_LOCK = ".clipkd.manifest.lock"
log = logging.getLogger(__name__)


class TargetRows:
    """Chosen rows of one or more stores, read on demand from their memory-mapped shards.

    ``rows[i]`` is the ``i``-th row; an integer index gives a (D,) float16 tensor, an array or tensor of indices
    a (n, D) one. Nothing is loaded up front: memory stays flat however large the store, and the object pickles
    without its maps (each loader worker and each rank maps the files itself).
    """

    def __init__(self, files: Sequence[tuple[str, int]], dim: int, rows: np.ndarray) -> None:
        self.files = [(str(f), int(n)) for f, n in files]
        self.dim = int(dim)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in self.files])]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.files[shard][0], mmap_mode="r")
        return self._maps[shard]

    def _row(self, g: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, g) - 1
        return self._map(shard)[g - int(self.starts[shard])]

    def __getitem__(self, index: Any) -> torch.Tensor:
        import torch  # here, not at the top: reading a store for search needs no PyTorch

        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(np.array(self._row(int(self.rows[index])), dtype=np.float16))
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.dim), np.float16)
        for j, g in enumerate(self.rows[idx].tolist()):
            out[j] = self._row(g)
        return torch.from_numpy(out)

    def numpy(self) -> np.ndarray:
        """Every chosen row as one (n, D) float16 array (loads them: for small selections)."""
        return self[np.arange(len(self))].numpy()

    @staticmethod
    def cat(parts: Sequence[TargetRows]) -> TargetRows:
        """The rows of ``parts``, one after the other."""
        files: list[tuple[str, int]] = []
        rows = []
        for p in parts:
            if p.dim != parts[0].dim:
                raise ClipkdError(f"cannot join stores of {parts[0].dim}-d and {p.dim}-d embeddings")
            rows.append(p.rows + sum(n for _, n in files))
            files += p.files
        return TargetRows(files, parts[0].dim, np.concatenate(rows) if rows else np.zeros(0, np.int64))


@dataclass
class StoreTargets:
    """Teacher embeddings for a list of images: ``targets[i]`` belongs to ``paths[keep[i]]``.

    ``dropped``: the images the store recorded as undecodable when it was built (left out, counted).
    """

    targets: TargetRows  # (len(keep), D) float16, read on demand
    keep: np.ndarray
    dropped: list[str]


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
            else:
                for i, r in zip(at.tolist(), local.tolist(), strict=True):
                    out[i] = np.frombuffer(os.pread(fd, row_bytes, offset + r * row_bytes), np.float16)
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
    """A store's row keys, read from its shards' path lists as rows are asked for (the last few shards' lists
    kept): indexing, ``len``, iteration and ``in`` as a list, without a Python string per row held."""

    CACHED = 32

    def __init__(self, store: EmbeddingStore) -> None:
        self.store, self.offsets = store, store.offsets
        self._lines: OrderedDict[int, list[str]] = OrderedDict()

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
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(row)
        number = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self._shard(number)[row - int(self.offsets[number])]

    def __iter__(self) -> Iterator[str]:
        for number in range(len(self.offsets) - 1):
            yield from self.store.shard_keys(number)


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


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _open_for_append(info: dict[str, Any], images: Path, out: Path, shard_size: int, files: Sequence[str],
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


def embed_images(
    teacher,
    images: str | Path,
    out: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    shard_size: int = 8192,
    progress: bool = True,
    max_images: int | None = None,
    compile: bool = False,
    device: str | None = "auto",
    precision: str = "auto",
    views: int = 1,
    view_hue: float | str = "auto",
    view_mix: str = "cutmix",
    split: str | Path | None = None,
    seed: int = 0,
) -> EmbeddingStore:
    """Embed every image of ``images`` (a folder, a ``path,label`` list, WebDataset shards or a Chinese-CLIP TSV:
    :func:`~clipkd.data.sources.open_source`) into the store at ``out`` (resuming).

    Images already in a finished shard (or recorded as skipped) are not recomputed; files that
    cannot be decoded are skipped and listed in the manifest. ``max_images`` stops after that
    many new images (used to test resumption). ``compile`` runs the image tower through
    ``torch.compile`` (checked against eager on the first batch; off by default: on a 2-core CPU it
    measured between -6 % and +3 % end to end, see benchmarks/bench_embed.py). ``teacher``: a loaded model, or a
    spec / ``clip-train`` run folder loaded on ``device`` once the images are found.

    ``views`` > 1: a **multi-view store** (clipkd's GZSL method, for every student that trains from it): each image
    and ``views``-1 views of it — flipped, mixed with a partner image by ``view_mix`` (CutMix by default), a share
    ``view_hue`` of them recoloured (``auto``: 0.5) — drawn once from ``seed``
    (:func:`~clipkd.data.views.make_view_plan`) and embedded once. With ``split``, only the seen classes' images get
    views, so a view and its partner are both of seen classes.
    """
    from .data.sources import open_source

    src = open_source(images)  # shards: rows keyed <shard>/<sample key>, each rank reading its own shards
    if split is not None and views == 1:
        raise ClipkdError("a `split` limits the images that get views (`views` ≥ 2); a plain store embeds every "
                          "image")
    from .data.views import resolve_view_hue

    hue = resolve_view_hue(view_hue, not isinstance(views, int) or views != 1,
                           "`views` ≥ 2 (a plain store embeds the images as they are)")
    plan = _view_plan(src, images, views, hue, view_mix, split, seed) if views != 1 else None
    check_can_create(out, "embedding store")  # before a teacher loads (nothing is created until the work starts)
    if isinstance(teacher, (str, Path)):
        from .teachers import load_teacher

        teacher = load_teacher(teacher, device, precision)
    if plan is not None:
        return embed_views(teacher, src.root, plan, out, batch_size, workers, progress, max_images)
    keys = list(dict.fromkeys(src.keys)) if src.kind == "list" else src.keys  # a list's paths key the store
    return embed_paths(teacher, src.root, keys, out, batch_size, workers, shard_size, progress, max_images, compile,
                       opener=src.opener, group=src.group, fingerprint=src.fingerprint)


def _view_plan(src, images, views: int, view_hue: float, mix: str, split, seed: int):
    """The checked plan of a multi-view store, before any teacher loads (errors name the API's fields);
    ``view_hue`` as :func:`~clipkd.data.views.resolve_view_hue` read it."""
    from .data.views import make_view_plan

    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ClipkdError(f"`views` must be an integer ≥ 1 (1: the images only), got {views!r}")
    if src.kind == "tsv":
        raise ClipkdError(f"{images} is a Chinese-CLIP TSV: views are composed from image files or shard samples")
    if split is not None:
        from .data.datasets import seen_images

        data, _ = seen_images(images, split)
        keys = list(dict.fromkeys(data.paths))
    else:
        keys = list(dict.fromkeys(src.keys))
    return make_view_plan(keys, views, mix, flip=True, seed=seed, hue_prob=float(view_hue))


def embed_paths(teacher, root: str | Path, files: Sequence[str], out: str | Path, batch_size: int = 64,
                workers: int | None = None, shard_size: int = 8192, progress: bool = True,
                max_images: int | None = None, compile: bool = False, opener=None, group=None,
                fingerprint=None) -> EmbeddingStore:
    """Embed the images ``root/f`` for ``f`` in ``files`` into the store at ``out``: the work behind
    :func:`embed_images`, for callers that choose the files themselves (the search index keys rows by absolute
    path, with ``root="/"``). ``opener(key)``: decodes images that are not files (rows of a Chinese-CLIP TSV;
    their recorded size is -1; ``fingerprint(key)``: their content fingerprint, recorded and checked as a file's
    is). ``group(key)``: what ranks split by (default: the key; a tar sample's shard, so that each rank reads its
    own shards)."""
    root, out = Path(root), Path(out)
    if batch_size < 1 or shard_size < 1 or (workers is not None and workers < 0):
        raise ClipkdError(f"batch size and shard size must be ≥ 1 and workers ≥ 0 (got {batch_size}, {shard_size}, "
                          f"{workers})")
    r = ranks()
    if r.distributed:
        check_peers(check_out_dir(out, "store"), "the embedding store")  # leftover launcher variables: refused
    # the ranks of one job share the store (their shards are merged under the manifest lock); other jobs wait
    with exclusive(out, "embedding store") if not r.distributed else nullcontext(check_out_dir(out, "store")):
        manifest, done = _open_for_append(teacher.describe(), root, out, shard_size, files, fingerprint)
        pending = my_share([f for f in files if f not in done], r, group)
        if max_images is not None:
            pending = pending[:max_images]
        writer = ShardWriter(out, manifest, shard_size, done)
        if not pending:
            writer.flush(final=True)
            _warn_share_only(r, out, len(files))
            return EmbeddingStore(out)

        if compile:
            teacher.compile_image_tower(batch_size)
        from .data.encode import iter_encoded
        from .data.loader import ImageDataset

        draft = max(manifest["preprocess"].get("size") or [0]) or None
        dataset = ImageDataset(root, pending, teacher.preprocess, draft_size=draft, opener=opener)
        desc = f"embed-images [rank {r.rank}/{r.world}]" if r.distributed else "embed-images"
        for b in iter_encoded(teacher.encode_image, dataset, batch_size, workers, progress, desc=desc):
            for idx, err in b.skipped:
                writer.skip(pending[idx], err)
            if b.outputs is not None:
                done_now = [pending[i] for i in b.index]
                not_files = opener is not None or group is not None  # TSV rows, tar samples: no size to record
                sizes = [-1] * len(done_now) if not_files else [_file_size(root / p) for p in done_now]
                if fingerprint is not None:  # TSV rows: the source's own fingerprint
                    prints = [fingerprint(p) for p in done_now]
                elif opener is not None and group is None:  # views: their plan records their images' prints
                    prints = [-1] * len(done_now)
                else:  # files and tar samples: from their bytes (a sample's in its shard)
                    prints = [content_fingerprint(root / p) for p in done_now]
                writer.add(b.outputs.numpy(), done_now, sizes, prints)
        writer.flush(final=True)
        if writer.skipped_count:
            log.warning("%d image(s) could not be decoded and were skipped; listed in %s", writer.skipped_count,
                        out / "manifest.json")
        _warn_share_only(r, out, len(files))
        return EmbeddingStore(out)


def _warn_share_only(r, out: Path, total: int) -> None:
    """A rank embeds its share only; when launcher variables (``RANK``/``WORLD_SIZE``, ``SLURM_NTASKS``) are left
    over in a shell, that is half a store with exit code 0 — so say how much of the store is there and why."""
    if not r.distributed:
        return
    st = EmbeddingStore(out)
    have = len(st) + int(st.manifest.get("skipped_count", 0))
    if have < total:
        log.warning("this process is rank %d of %d (from RANK/WORLD_SIZE or SLURM_* in the environment) and embedded "
                    "its share only: the store holds %d of %d images until every rank has run; unset those variables "
                    "to embed everything in one process", r.rank, r.world, have, total)


# --- the seed's layout: one .npy per image (NVIDIA clip-distillation, the first seed) ---

def _npy_name(path: str, flat: bool) -> str:
    return (Path(path).stem if flat else Path(path).with_suffix("").as_posix()) + ".npy"


def import_npy_folder(npy_dir: str | Path, images: str | Path, out: str | Path, teacher: str,
                      preprocess: dict[str, Any] | None = None, shard_size: int = 8192,
                      progress: bool = True) -> EmbeddingStore:
    """Build a store from one ``.npy`` per image: ``npy_dir/<image stem>.npy`` (the seed's flat layout)
    or ``npy_dir/<relative path without extension>.npy``. Rows are L2-normalised. ``teacher``: the spec (or
    clip-train run) of the model that made them, recorded as the identity that model reports when loaded
    (:func:`~clipkd.teachers.factory.teacher_identity`), so that its own online targets and text embeddings match
    the store. Images with no ``.npy`` are counted and listed; unreadable ``.npy`` files are skipped and listed like
    undecodable images."""
    from .teachers.factory import teacher_identity

    npy_dir, images, out = Path(npy_dir), Path(images), Path(out)
    teacher = teacher_identity(teacher)
    if not npy_dir.is_dir():
        raise ClipkdError(f"embedding folder not found: {npy_dir}")
    files = list_images(images)
    flat = not any((npy_dir / _npy_name(f, False)).is_file() for f in files[:50])
    if flat:
        stems: dict[str, list[str]] = {}
        for f in files:
            stems.setdefault(Path(f).stem, []).append(f)
        dupes = [v for v in stems.values() if len(v) > 1]
        if dupes:
            raise ClipkdError(f"{len(dupes)} image names repeat across folders (e.g. {dupes[0][:2]}), so a flat "
                              f"folder of <name>.npy files in {npy_dir} is ambiguous; use <relative path>.npy")
    have = [f for f in files if (npy_dir / _npy_name(f, flat)).is_file()]
    if not have:
        raise ClipkdError(f"no .npy file in {npy_dir} matches an image under {images} "
                          f"(expected e.g. {npy_dir / _npy_name(files[0], True)})")
    first = np.load(npy_dir / _npy_name(have[0], flat)).reshape(-1)
    info = {"teacher": teacher, "embed_dim": int(first.size), "preprocess": preprocess or {}}
    with exclusive(out, "embedding store"):
        manifest, done = _open_for_append(info, images, out, shard_size, have)
        writer = ShardWriter(out, manifest, shard_size, done)
        for f in tqdm([f for f in have if f not in done], desc="import .npy", unit="file", disable=not progress):
            try:
                v = np.load(npy_dir / _npy_name(f, flat)).astype(np.float32).reshape(-1)
                if v.size != info["embed_dim"]:
                    raise ValueError(f"size {v.size}, expected {info['embed_dim']}")
            except (OSError, ValueError) as e:
                writer.skip(f, f"{type(e).__name__}: {e}")
                continue
            writer.add((v / max(float(np.linalg.norm(v)), 1e-12))[None], [f], [_file_size(images / f)],
                       [content_fingerprint(images / f)])
        writer.flush(final=True)
    if len(have) < len(files):
        log.warning("%d of %d images have no .npy in %s, e.g. %s", len(files) - len(have), len(files), npy_dir,
                    [f for f in files if f not in set(have)][:3])
    return EmbeddingStore(out)


def export_npy_folder(store: str | Path, out: str | Path, flat: bool = True) -> int:
    """Write each store row as ``out/<image stem>.npy`` (float32; the seed's layout), or with
    ``flat=False`` as ``out/<relative path without extension>.npy``. Returns the number written."""
    st, out = EmbeddingStore(store), Path(out)
    names = [_npy_name(p, flat) for p in st.paths]
    if flat and len(set(names)) < len(names):
        raise ClipkdError(f"store {store} has images with the same file name in different folders; "
                          "export with the mirrored layout (`mirror`)")
    emb = st.embeddings()
    for name, row in zip(names, emb, strict=True):
        write_npy(out / name, np.asarray(row, dtype=np.float32))
    return len(names)


def embed_views(teacher, root: str | Path, plan, out: str | Path, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, max_images: int | None = None) -> EmbeddingStore:
    """Embed every view of a :class:`~clipkd.data.views.ViewPlan` over the images under ``root`` into the store at
    ``out`` (rows keyed ``path#view=k``; the plan saved beside them as ``views.json``). Resumes like
    :func:`embed_images`; a store of another plan (other images, view count, mix or seed) is refused."""
    from .data.views import ViewPlan

    out = Path(out)
    saved = out / "views.json"
    if saved.is_file():
        old = ViewPlan.load(saved)
        if old.settings() != plan.settings() or old.images != plan.images:
            raise ClipkdError(f"{out} holds the views of another plan ({old.settings()}, {len(old.images)} images; "
                              f"now {plan.settings()}, {len(plan.images)} images); use another folder")
        old.check_files(root, old.images, f"store of views {out}")  # resuming over other files would mix them
    elif (out / "manifest.json").exists():
        raise ClipkdError(f"{out} is a store of plain images, not of views; use another folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        plan.record_sizes(root)
        plan.save(saved)
    return embed_paths(teacher, root, plan.keys(), out, batch_size, workers, progress=progress,
                       max_images=max_images, opener=plan.opener(root))
