"""A searchable image index: an embedding store (resumable, sharded, corrupt files skipped and counted) plus a
FAISS index over its rows.

Layout of an index folder::

    index.json     the model (reference, identity, size, preprocessing), the collection root, the FAISS kind, rows,
                   recall@10
    model/         the exported towers or student checkpoint the index was built with, copied in (image/, text/)
    store/         the embedding store; rows keyed by their path relative to the collection root
    labels.tsv     key<TAB>label for sources that have labels (class folders, image lists)
    gen/<N>/       one generation: ``faiss.index`` (``faiss.write_index``), ``rows.npy`` (FAISS position → store row),
                   ``tombstones.npy`` (positions removed, skipped by queries until ``index compact``) and
                   ``removed.txt`` (keys removed); written whole, then named by index.json's ``generation`` (written
                   last, atomically), so a reader (a running ``serve``) sees one generation or the next, never a mix

The folder names no absolute path of the machine that built it: the collection root and any model file outside
``model/`` are recorded relative to the index folder, so an index moved or copied with its images (``mv``,
``rsync``) keeps working, and one copied to a server without them is pointed at the images there
(``serve --images ROOT``).

Exact inner product (``flat``) up to :data:`EXACT_MAX` rows, where one query costs a few milliseconds on a
2-core CPU (17 ms at 100,000 512-d rows, 0.2 ms with HNSW at recall@10 1.000: ``benchmarks/bench_search.py``);
HNSW above it (or ``ivf``/``ivfpq`` on request), with its
recall@10 against exact measured at build time and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.images import load_rgb
from ..distributed import barrier, ranks
from ..errors import ClipkdError, first_line
from ..fileio import atomic_write, exclusive, read_json, relative, write_json, write_npy, write_text
from ..store import EmbeddingStore, embed_paths

if TYPE_CHECKING:
    from .encoder import Encoder

log = logging.getLogger(__name__)
INDEX_FORMAT = "clipkd-index/1"
EXACT_MAX = 30_000  # rows up to which `auto` keeps exact search: ~5 ms a query on 2 cores (17 ms at 100k, measured)
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ClipkdError("search needs FAISS: pip install 'clipkd[search]' (faiss-cpu)") from None
    return faiss


@dataclass
class Source:
    """Images to index: their ``root`` (absolute) and keys under it (``FILE.tsv#image_id`` for a Chinese-CLIP TSV's
    rows), and labels by key where known."""

    root: Path
    paths: list[str]
    labels: dict[str, str]
    opener: Any = None
    columns: dict[str, dict[str, str]] = field(default_factory=dict)  # an image list's other columns, by key

    def under(self, root: Path) -> Source:
        """The same images keyed relative to ``root`` (``../`` where they lie outside it)."""
        if root == self.root:
            return self
        keys = {k: rekey(k, self.root, root) for k in self.paths}
        return Source(root, list(keys.values()), {keys[k]: v for k, v in self.labels.items()},
                      TsvOpener(root) if self.opener is not None else None,
                      {c: {keys[k]: v for k, v in col.items() if k in keys} for c, col in self.columns.items()})


def rekey(key: str, old: Path, new: Path) -> str:
    """A key under ``old`` as a key under ``new`` (POSIX, ``../`` where it climbs out)."""

    file, row = split_key(key)
    rel = relative(old / file, new)
    return f"{rel}#{row}" if row else rel


class TsvOpener:
    """Decodes ``file.tsv#image_id`` keys (under ``root``) from their Chinese-CLIP TSVs (picklable, for loader
    workers)."""

    def __init__(self, root: str | Path = "/") -> None:
        self.root = Path(root)
        self.tsvs: dict[str, Any] = {}

    def __call__(self, key: str):
        return self._tsv(key).open(split_key(key)[1])

    def _tsv(self, key: str):
        from ..data.images import TsvImages

        path = split_key(key)[0]
        if path not in self.tsvs:
            self.tsvs[path] = TsvImages(self.root / path)
        return self.tsvs[path]

    def fingerprint(self, key: str) -> int:
        """The content fingerprint of a ``/abs/file.tsv#image_id`` row (-1: gone)."""
        try:
            return self._tsv(key).fingerprint(split_key(key)[1])
        except ClipkdError:  # the TSV is gone
            return -1


def read_source(images: str | Path) -> Source:
    """A folder (class sub-folders give labels), a ``path,label`` image list, a Chinese-CLIP ``*_imgs.tsv``, or
    WebDataset shards (labels: the samples' ``.cls``/``.json``), keyed relative to the folder (the list's folder,
    the TSV's, the shards')."""
    import os

    from ..data.sources import open_source

    src = open_source(images)
    root = src.root.resolve()
    if src.kind == "tsv":
        return Source(root, [f"{Path(images).name}#{i}" for i in src.keys], {}, TsvOpener(root))
    paths = list(src.keys)
    if src.kind == "list":  # a list's paths may climb out of its folder (`../x.jpg`, absolute): the root is then
        files = [str((root / k).resolve()) for k in src.keys]  # the folder that holds them all
        if any(not f.startswith(str(root) + os.sep) for f in files):
            root = Path(os.path.commonpath(files))
            root = root if root.is_dir() else root.parent
        paths = [relative(f, root) for f in files]
    labels = src.labels or [None] * len(paths)
    columns = {}
    if src.kind == "list":
        from ..data.datasets import read_list_columns

        key = {listed: p for listed, p in zip(src.keys, paths, strict=True)}
        columns = {c: {key[k]: v for k, v in col.items() if k in key}
                   for c, col in read_list_columns(images).items()}
    return Source(root, paths, {p: lab for p, lab in zip(paths, labels, strict=True) if lab is not None},
                  columns=columns)


def split_key(key: str) -> tuple[str, str]:
    """An index row's key as ``(file, row)``: ``row`` the image id of a Chinese-CLIP TSV row (``FILE.tsv#ID``), else
    ``""`` (a file, whose name may hold a ``#``: ``/photos/#1.jpg``). The one parser of ``#`` in row keys."""
    head, sep, row = key.rpartition("#")
    return (head, row) if sep and head.lower().endswith(".tsv") else (key, "")


def is_tsv_key(path: str) -> bool:
    """Whether an index row names a Chinese-CLIP TSV row rather than a file."""
    return bool(split_key(path)[1])


def _model_ref(model: str | Path | None, out: Path, role: str) -> str | None:
    """How ``out``'s index.json names a model so that it moves with the index: an exported tower (``.onnx``) or a
    distilled student's checkpoint is copied into ``out/model/`` and named there; another file or folder (a
    clip-train run, a weights file in a spec) is named relative to ``out``; a spec of published weights as it is."""
    import os
    import shutil

    from ..fileio import file_fingerprint

    if model is None:
        return None
    p = Path(str(model))
    if p.exists():
        from .encoder import is_student

        src = p / "student.pt" if p.is_dir() and is_student(p) else p
        if src.is_file() and (src.suffix == ".onnx" or is_student(p)):
            if src.resolve().parent == (out / "model" / role).resolve():  # already the index's own copy
                return f"model/{role}/{src.name}"
            dst = out / "model" / role / src.name  # the name kept: a deployed model's identity names its file
            if not dst.is_file() or file_fingerprint(dst, 1 << 20) != file_fingerprint(src, 1 << 20):
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.partial")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            return f"model/{role}/{dst.name}"
        return relative(p, out)
    head, sep, tail = str(model).rpartition("@")
    if sep and Path(tail).is_absolute() and Path(tail).exists():  # a spec naming a local weights file
        return f"{head}@{relative(tail, out)}"
    return str(model)


def _resolve_ref(ref: str | None, root: Path) -> str | None:
    """A model named in index.json, as a path or spec that loads from here (:func:`_model_ref` in reverse)."""
    if ref is None:
        return None
    if not Path(ref).is_absolute() and (root / ref).exists():
        return str(root / ref)
    head, sep, tail = ref.rpartition("@")
    if sep and ":" in head and not Path(tail).is_absolute() and (root / tail).exists():
        return f"{head}@{(root / tail).resolve()}"
    return ref


GENERATIONS = "gen"  # gen/<N>/: one generation of the FAISS index, written whole before index.json names it
REBUILD = "re-run the `clipkd index build` that made it (its stored embeddings are reused)"


class _Pruned(Exception):
    """The generation index.json named was removed by a newer writer before it could be read."""


@dataclass
class Generation:
    """One state of an index's FAISS side: ``rows`` maps FAISS positions to store rows, ``tombstones`` are the
    positions ``index remove`` marked (still in FAISS, skipped by queries until ``index compact``), ``removed`` the
    keys removed (tombstoned or compacted out)."""

    number: int
    index: Any
    rows: np.ndarray
    tombstones: np.ndarray
    removed: set[str]
    path: Path | None = None  # the FAISS file (None: an index of clipkd before generations)


def read_generation(root: Path, info: dict[str, Any], mmap: bool = False) -> Generation:
    """The generation ``info`` (index.json) names, loaded; damaged files are one line naming the index. ``mmap``:
    an IVF index's lists are memory-mapped read-only (pages are read as queries touch them: start-up and resident
    memory do not grow with the rows), for searching; writers load it whole."""
    faiss = _faiss()
    number = info.get("generation")
    try:
        if number is None:  # clipkd before generations: one serialised array beside index.json
            return Generation(0, faiss.deserialize_index(np.load(root / "faiss.npy")), np.load(root / "rows.npy"),
                              np.zeros(0, np.int64), _read_lines(root / "removed.txt"))
        d = root / GENERATIONS / str(int(number))
        if not d.is_dir():
            raise _Pruned
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and info.get("kind") in ("ivf", "ivfpq") else 0
        index = faiss.read_index(str(d / "faiss.index"), flags)
        gen = Generation(int(number), index, np.load(d / "rows.npy"), np.load(d / "tombstones.npy"),
                         _read_lines(d / "removed.txt"), d / "faiss.index")
    except _Pruned:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, TypeError) as e:
        if number is not None and not (root / GENERATIONS / str(int(number))).is_dir():
            raise _Pruned from None
        raise ClipkdError(f"index {root} is damaged ({first_line(e, 120)}); {REBUILD}") from None
    if gen.index.ntotal != len(gen.rows) or (len(gen.tombstones) and (
            gen.tombstones.min() < 0 or gen.tombstones.max() >= len(gen.rows))):
        raise ClipkdError(f"index {root}: FAISS holds {gen.index.ntotal} rows, rows.npy {len(gen.rows)}, "
                          f"tombstones {len(gen.tombstones)}; {REBUILD}")
    return gen


def _read_lines(path: Path) -> set[str]:
    return set(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else set()


def _current(root: Path) -> Generation | None:
    """The generation on disk now (under the writer's lock), or None for a folder with no index yet."""
    if not (root / "index.json").is_file():
        return None
    return read_generation(root, read_json(root / "index.json", "index description"))


def commit_generation(root: Path, info: dict[str, Any], index: Any, rows: np.ndarray, tombstones: np.ndarray,
                      removed: set[str], same_faiss: Path | None = None) -> dict[str, Any]:
    """Write the next generation (FAISS file, rows, tombstones, removed keys) into ``gen/<N>/``, then name it in
    index.json (atomically: a reader sees the old generation or the new, never a mix), then prune all but the two
    newest. ``same_faiss``: the FAISS file is unchanged (a removal) and is hard-linked, not written again. Called
    under the index folder's lock."""
    import os
    import shutil

    faiss = _faiss()
    on_disk = read_json(root / "index.json", "index description") if (root / "index.json").is_file() else {}
    number = int(on_disk.get("generation", 0)) + 1
    d = root / GENERATIONS / str(number)
    if d.exists():  # what a killed writer left: no index.json names it
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if same_faiss is not None:
        try:
            os.link(same_faiss, d / "faiss.index")
        except OSError:  # another file system, or no hard links: a copy
            shutil.copyfile(same_faiss, d / "faiss.index")
    else:
        atomic_write(d / "faiss.index", lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))
    write_npy(d / "rows.npy", np.asarray(rows, np.int64))
    write_npy(d / "tombstones.npy", np.asarray(tombstones, np.int64))
    write_text(d / "removed.txt", "".join(f"{p}\n" for p in sorted(removed)))
    info = {**info, "generation": number, "rows": int(len(rows) - len(tombstones)), "tombstones": int(len(tombstones)),
            "removed": len(removed)}
    write_json(root / "index.json", info)
    for old in (root / GENERATIONS).iterdir():  # a server still reading generation N-1 keeps it
        if old.name.isdigit() and int(old.name) < number - 1:
            shutil.rmtree(old, ignore_errors=True)
    for legacy in ("faiss.npy", "rows.npy", "removed.txt"):  # the layout before generations
        (root / legacy).unlink(missing_ok=True)
    return info


class SearchIndex:
    """An index folder opened for search; ``encoder`` loads the model that made it (checked by identity)."""

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        self.root = Path(root)
        if not (self.root / "index.json").is_file():
            raise ClipkdError(f"not a search index (no index.json): {self.root}; build one with `clipkd index build`")
        self.info: dict[str, Any] = read_json(self.root / "index.json", "index description")
        if not isinstance(self.info, dict) or self.info.get("format") != INDEX_FORMAT:
            raise ClipkdError(f"{self.root / 'index.json'} is not a {INDEX_FORMAT} description")
        rebuild = REBUILD
        missing = [k for k in ("identity", "model", "embed_dim", "kind") if k not in self.info]
        if missing:
            raise ClipkdError(f"index {self.root} is damaged: index.json lacks {missing}; {rebuild}")
        if self.info["kind"] not in KINDS or self.info["kind"] == "auto":
            raise ClipkdError(f"index {self.root} is damaged: index.json names kind {self.info['kind']!r}; {rebuild}")
        for _ in range(5):  # a generation pruned by a newer writer between reading index.json and its files
            try:
                gen = read_generation(self.root, self.info, mmap=True)
                break
            except _Pruned:
                again = read_json(self.root / "index.json", "index description")
                if again.get("generation") == self.info.get("generation"):
                    raise ClipkdError(f"index {self.root} is damaged: {GENERATIONS}/{self.info.get('generation')} "
                                      f"is gone; {rebuild}") from None
                self.info = again
        else:
            raise ClipkdError(f"index {self.root} changes faster than it can be opened; try again")
        self.store = EmbeddingStore(self.root / "store")
        self.paths = self.store.paths
        self.generation, self.index, self.rows = gen.number, gen.index, gen.rows
        self.tombstones, self.removed = gen.tombstones, gen.removed
        if len(self.rows) and int(self.rows.max()) >= len(self.paths):
            raise ClipkdError(f"index {self.root} is damaged: its FAISS rows name store rows the store does not hold; "
                              f"{rebuild}")
        self.live = np.zeros(len(self.paths), dtype=bool)  # store rows a query can return
        self.live[self.rows] = True
        self.live[self.rows[self.tombstones]] = False
        self.labels = _read_labels(self.root / "labels.tsv")
        # the collection root: given (the images on this machine), else where index.json says, relative to the
        # index (indexes of clipkd before portable indexes keyed rows by absolute path: root /)
        self.images_root = Path(images).resolve() if images is not None else \
            (self.root / self.info.get("images", "/")).resolve()
        try:
            self._set_search_params()
        except AttributeError:
            raise ClipkdError(f"index {self.root} is damaged: index.json says kind {self.info['kind']!r} but "
                              f"its FAISS file holds a {type(self.index).__name__}; {rebuild}") from None
        self.encoder: Encoder | None = None

    @property
    def identity(self) -> str:
        return self.info["identity"]

    @property
    def model(self) -> str:
        """The model that built the index, as it loads from here (copied in, or relative to the index)."""
        return _resolve_ref(self.info["model"], self.root)

    @property
    def text_model(self) -> str | None:
        return _resolve_ref(self.info.get("text_model"), self.root)

    def image_path(self, row: int) -> Path:
        """Where a row's image file lies on this machine (a TSV row: its TSV file)."""
        return self.images_root / split_key(self.paths[row])[0]

    def check_images(self, sample: int = 64) -> int:
        """Refuse, in one line, a collection root that is not here or lacks most rows (a moved index whose images
        stayed behind); returns how many of the sampled rows are missing."""
        if not self.images_root.is_dir():
            raise ClipkdError(f"the images of index {self.root} are not at {self.images_root}: give the folder "
                              "that holds them here (`--images ROOT`, the folder the index was built from)")
        from ..data.tars import tar_member_path

        rows = np.unique(np.linspace(0, len(self.paths) - 1, min(sample, len(self.paths))).astype(int))
        # a file, a TSV row's TSV, or a WebDataset sample's shard (``shard.tar/key``)
        missing = sum(not (self.image_path(int(r)).exists() or tar_member_path(self.image_path(int(r))))
                      for r in rows)
        if missing * 2 > len(rows):
            raise ClipkdError(f"{missing} of {len(rows)} sampled images of index {self.root} are not under "
                              f"{self.images_root} (e.g. {self.paths[int(rows[0])]}): the wrong `--images` root?")
        if missing:
            log.warning("%d of %d sampled images of index %s are missing under %s", missing, len(rows), self.root,
                        self.images_root)
        return missing

    def __len__(self) -> int:
        """Rows a query can return (FAISS rows less the tombstones of removed images)."""
        return int(self.index.ntotal) - len(self.tombstones)

    def is_live(self, row: int) -> bool:
        """Whether store row ``row`` is in the index and not removed."""
        return 0 <= row < len(self.live) and bool(self.live[row])

    def _set_search_params(self) -> None:
        kind = self.info.get("kind")
        if kind == "hnsw":
            self.index.hnsw.efSearch = int(self.info.get("params", {}).get("efSearch", 64))
        elif kind in ("ivf", "ivfpq"):
            self.index.nprobe = int(self.info.get("params", {}).get("nprobe", 16))

    def load_encoder(self, model: str | Path | None = None, text_model: str | Path | None = None,
                     device: str | None = "auto", precision: str = "auto") -> Any:
        """The model that built the index (or ``model``, refused unless it is the same one). An exported student
        (with no text model, or an exported text tower) is run without PyTorch (:mod:`clipkd.deployed`); anything
        else, or a pair that cannot be (the reason is logged), through :mod:`clipkd.models`."""
        from ..deployed import NotDeployable, load_deployed

        model = model or self.model
        text = text_model if text_model is not None else (self.text_model if model == self.model else None)
        try:
            enc = load_deployed(model, text, device)
        except NotDeployable as why:
            if str(model).endswith(".onnx"):
                log.info("querying %s through PyTorch: %s", self.root, why)
            try:
                from .encoder import load_encoder
            except ImportError as e:
                raise ClipkdError(f"querying {self.root} needs PyTorch ({e.name} is not installed): {why}") from None
            enc = load_encoder(model, text, device, precision)
        check_model(self, enc)
        self.encoder = enc
        return enc

    @property
    def columns(self) -> dict[str, dict[str, str]]:
        """What rows can be filtered on: ``label`` and an image list's other columns, ``column → {key → value}``."""
        if not hasattr(self, "_columns"):
            self._columns = {"label": self.labels, **_read_columns(self.root)}
        return self._columns

    def allowed(self, label: str | None = None, where: dict[str, str] | None = None) -> np.ndarray | None:
        """The FAISS positions whose rows match ``label`` and every ``column: value`` of ``where`` (None: no
        filter). A column the index does not have is a one-line error naming those it has."""
        want = {**({"label": label} if label is not None else {}), **(where or {})}
        if not want:
            return None
        cache = self.__dict__.setdefault("_allowed", {})
        frozen = tuple(sorted(want.items()))
        if frozen in cache:
            return cache[frozen]
        unknown = sorted(c for c in want if c not in self.columns or (c == "label" and not self.labels))
        if unknown:
            have = [c for c in self.columns if c != "label" or self.labels]
            raise ClipkdError(f"index {self.root} has no column {unknown[0]!r} to filter on (it has: "
                              f"{', '.join(have) or 'none'})")
        keys = np.asarray(self.paths)[self.rows]
        ok = np.ones(len(self.rows), dtype=bool)
        ok[self.tombstones] = False
        for c, v in want.items():
            col = self.columns[c]
            ok &= np.fromiter((col.get(k) == str(v) for k in keys), dtype=bool, count=len(keys))
        if len(cache) > 256:
            cache.clear()
        cache[frozen] = np.flatnonzero(ok).astype(np.int64)
        return cache[frozen]

    def search_vectors(self, queries: np.ndarray, k: int = 10,
                       allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, store rows) for unit query vectors (rows of -1 where fewer than ``k`` exist), among
        the FAISS positions ``allowed`` when given (:meth:`allowed`): exact over them from the store when they are
        few (under a tenth of the rows), else inside FAISS (``IDSelector``: exact on a flat index), and exactly
        again where an approximate search found fewer than ``k`` of them. Removed rows are never returned."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.info["embed_dim"])
        if allowed is None and len(self.tombstones):
            scores, pos = self._skip_tombstones(q, min(k, max(1, len(self))))
        elif allowed is None:
            scores, pos = self.index.search(q, min(k, max(1, len(self))))
        elif not len(allowed):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        elif len(allowed) * 10 < len(self):
            scores, pos = self._exact(q, k, allowed)
        else:
            want = min(k, len(allowed))
            scores, pos = self.index.search(q, want, params=self._params(self._selector(allowed), k,
                                                                         len(allowed) / max(1, len(self))))
            if (pos < 0).sum(1).max() > 0:  # the graph or the probed lists ran out of matches: exact instead
                scores, pos = self._exact(q, k, allowed)
        rows = np.where(pos >= 0, self.rows[np.clip(pos, 0, None)], -1)
        return scores, rows

    def _selector(self, allowed: np.ndarray) -> Any:
        """A FAISS selector of ``allowed`` (kept per array: :meth:`allowed` caches its arrays)."""
        cache = self.__dict__.setdefault("_selectors", {})
        key = (allowed.__array_interface__["data"][0], len(allowed))
        if key not in cache or cache[key][0] is not allowed:
            if len(cache) > 64:
                cache.clear()
            cache[key] = (allowed, _faiss().IDSelectorBatch(allowed))
        return cache[key][1]

    def _params(self, sel: Any, k: int, share: float = 1.0) -> Any:
        """Search parameters with selector ``sel`` letting ``share`` of the rows through: the graph walk (HNSW) or
        the lists probed (IVF) grow as the share shrinks, so that as many matching candidates are seen as an
        unfiltered search sees (recall@10 by filter share: ``benchmarks/results/search-live.md``)."""
        faiss = _faiss()
        kind = self.info["kind"]
        grow = 1 / max(share, 0.05)
        if kind == "hnsw":
            ef = max(self.index.hnsw.efSearch, 4 * k)
            return faiss.SearchParametersHNSW(sel=sel, efSearch=int(min(2048, ef * grow)))
        if kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(min(self.index.nlist, self.index.nprobe * grow)))
        return faiss.SearchParameters(sel=sel)

    def _skip_tombstones(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` FAISS positions that are not tombstones: the search skips them (``IDSelectorNot``); where an
        approximate search then finds fewer than ``k``, the plain search is oversampled by the tombstones."""
        faiss = _faiss()
        if not hasattr(self, "_not_removed"):
            inner = faiss.IDSelectorBatch(self.tombstones)
            self._not_removed = (inner, faiss.IDSelectorNot(inner))  # the inner selector must outlive the outer
        scores, pos = self.index.search(q, k, params=self._params(self._not_removed[1], k))
        if (pos < 0).any():
            more = min(int(self.index.ntotal), k + len(self.tombstones))
            s2, p2 = self.index.search(q, more)
            dead = np.isin(p2, self.tombstones) | (p2 < 0)
            order = np.argsort(dead, axis=1, kind="stable")[:, :k]
            scores, pos = np.take_along_axis(s2, order, 1), np.where(
                np.take_along_axis(dead, order, 1), -1, np.take_along_axis(p2, order, 1))
        return scores, pos

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` among FAISS positions ``allowed``, from the stored embeddings."""
        vectors = np.asarray(self.store.embeddings()[self.rows[allowed]], dtype=np.float32)
        sims = q @ vectors.T
        k = min(k, len(allowed))
        top = np.argsort(-sims, axis=1)[:, :k]
        return np.take_along_axis(sims, top, 1), allowed[top]

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """One query's results as dicts: ``id`` (the store row), ``path``, ``score``, ``label``."""
        out = []
        for s, r in zip(scores.tolist(), rows.tolist(), strict=True):
            if r < 0:
                continue
            path = self.paths[r]
            score = min(1.0, max(-1.0, float(s)))  # a cosine: fp16 rows and FAISS rounding can pass 1 by 1e-5
            out.append({"id": int(r), "path": path, "score": round(score, 6), "label": self.labels.get(path)})
        return out

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of a row (for "search by this result")."""
        if not self.is_live(row):
            raise KeyError(row)
        return np.asarray(self.store.embeddings()[row], dtype=np.float32)

    def open_image(self, row: int):
        """The picture of an indexed row, decoded (files and Chinese-CLIP TSV rows alike)."""
        path = self.paths[row]
        return TsvOpener(self.images_root)(path).convert("RGB") if is_tsv_key(path) else load_rgb(self.image_path(row))

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Unit embeddings of PIL images with the index's model (loaded on first use)."""
        enc = self.encoder or self.load_encoder()
        return enc.encode_batch([enc.preprocess(im) for im in images])

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.encoder or self.load_encoder()
        return np.asarray(enc.encode_text(list(texts)), dtype=np.float32)

    def search(self, image: str | Path | None = None, text: str | None = None, k: int = 10,
               label: str | None = None, where: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Top-``k`` results for an image file or a text; with ``label`` / ``where`` (``{column: value}``), among
        the images that match them (none matching: no results)."""
        allowed = self.allowed(label, where)
        if (image is None) == (text is None):
            raise ClipkdError("give exactly one query: an image or a text")
        if text is not None:
            if not text.strip():
                raise ClipkdError("the text query is empty")
            q = self.embed_text([text])
        else:
            try:
                img = load_rgb(image)
            except Exception as e:  # noqa: BLE001 - any decode failure is the user's query file
                raise ClipkdError(f"cannot read query image {image}: {type(e).__name__}: {e}") from None
            q = self.embed_images([img])
        scores, rows = self.search_vectors(q, k, allowed)
        return self.hits(scores[0], rows[0])

    def save_grid(self, hits: Sequence[dict[str, Any]], out: str | Path, image: str | Path | None = None,
                  text: str | None = None) -> Path:
        """A PNG of a query (``image`` file, or ``text`` as a title) followed by its ``hits`` from :meth:`search`."""
        from ..evaluation.plots import plot_search_grid

        rows = {h["path"]: h["id"] for h in hits}
        return plot_search_grid(load_rgb(image) if image else None, text or str(image), hits,
                                lambda p: self.open_image(rows[p]), out)


def _read_labels(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        p, _, label = line.partition("\t")
        out[p] = label
    return out


def check_model(index: SearchIndex, encoder: Encoder) -> None:
    """Refuse a model that did not build the index (other identity or embedding size), in one line."""
    if encoder.identity != index.identity or encoder.embed_dim != index.info["embed_dim"]:
        raise ClipkdError(f"index {index.root} was built by '{index.identity}' ({index.info['embed_dim']}-d), not by "
                          f"'{encoder.identity}' ({encoder.embed_dim}-d); query it with its own model or build another")


def _choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise ClipkdError(f"unknown index kind '{kind}' (choose from {', '.join(KINDS)})")
    if kind == "auto":
        return "flat" if n <= EXACT_MAX else "hnsw"
    return kind


def make_faiss(vectors: np.ndarray, kind: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index of ``kind`` over ``vectors`` (N, D) float32, and its search parameters."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict[str, Any] = {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        params = {"M": 32, "efSearch": 64}
        index.hnsw.efSearch = 64
    else:
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39 if n >= 39 else 1)))
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        if n < (256 if kind == "ivfpq" else nlist):
            raise ClipkdError(f"{n} images are too few for a {kind} index; use `kind`=flat")
        rng = np.random.default_rng(seed)
        train = vectors[rng.choice(n, min(n, 100_000), replace=False)]
        index.train(train)
        index.nprobe = min(nlist, 16)
        params = {"nlist": nlist, "nprobe": int(index.nprobe)}
    index.add(vectors)
    return index, params


def recall_at_10(index: Any, vectors: np.ndarray, queries: int = 1000, seed: int = 0) -> float:
    """Recall@10 of ``index`` against exact inner-product search, on stored vectors used as queries."""
    faiss = _faiss()
    n = len(vectors)
    q = vectors[np.random.default_rng(seed).choice(n, min(queries, n), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(10, n)
    _, want = exact.search(q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want.tolist(), got.tolist(), strict=True)]))


COMPACT_SHARE = 0.2  # removed rows past this share of the FAISS rows: `index remove` suggests `index compact`


def _removed_now(root: Path) -> set[str]:
    """The keys removed from the index at ``root`` as it is on disk (without loading its FAISS file, which a rebuild
    may be replacing because it is damaged)."""
    if not (root / "index.json").is_file():
        return set()
    number = read_json(root / "index.json", "index description").get("generation")
    return _read_lines(root / GENERATIONS / str(int(number)) / "removed.txt" if number is not None
                       else root / "removed.txt")


def _write_faiss(root: Path, store: EmbeddingStore, kind: str, info: dict[str, Any],
                 restore: Sequence[str] = ()) -> dict[str, Any]:
    """Build the FAISS index over the store's rows that are not removed (``restore``: keys added again, no longer
    removed) and commit it as the next generation."""
    removed = _removed_now(root) - set(restore)
    keep = np.array([i for i, p in enumerate(store.paths) if p not in removed], dtype=np.int64)
    if not len(keep):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    vectors = np.ascontiguousarray(store.embeddings()[keep], dtype=np.float32)
    chosen = _choose_kind(kind, len(keep))
    index, params = make_faiss(vectors, chosen)
    recall = 1.0 if chosen == "flat" else recall_at_10(index, vectors)
    info = {**info, "kind": chosen, "requested_kind": kind, "params": params,
            "skipped": int(store.manifest["skipped_count"]), "recall@10": round(recall, 4),
            "recall_rows": int(len(keep))}
    info = commit_generation(root, info, index, keep, np.zeros(0, np.int64), removed)
    log.info("index %s: %d rows, %s, recall@10 vs exact %.3f", root, len(keep), chosen, recall)
    return info


def _tombstones(rows: np.ndarray, paths: Sequence[str], removed: set[str]) -> np.ndarray:
    """The FAISS positions whose store rows are removed keys."""
    if not removed:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.fromiter((paths[r] in removed for r in rows.tolist()), bool, len(rows)))


def _append_faiss(root: Path, store: EmbeddingStore, info: dict[str, Any], restore: Sequence[str]) -> dict[str, Any]:
    """Add the store's rows that the FAISS index lacks to it (flat, IVF and IVF-PQ append to their lists with the
    trained quantizer, HNSW links them into its graph): no rebuild. Keys in ``restore`` are no longer removed."""
    cur = _current(root)
    if cur is None or cur.path is None or (len(cur.rows) and int(cur.rows.max()) >= len(store)):
        # no index yet, one of clipkd before generations, or a store that lost a damaged shard: rebuilt
        return _write_faiss(root, store, info.get("requested_kind", info["kind"]), info, restore)
    removed = cur.removed - set(restore)
    paths = store.paths
    listed = np.zeros(len(paths), dtype=bool)
    listed[cur.rows] = True
    new = np.flatnonzero(~listed & ~np.fromiter((p in removed for p in paths), bool, len(paths)))
    index = cur.index
    emb = store.embeddings()
    for start in range(0, len(new), 65_536):
        index.add(np.ascontiguousarray(emb[new[start:start + 65_536]], dtype=np.float32))
    rows = np.concatenate([cur.rows, new]).astype(np.int64)
    tomb = _tombstones(rows, paths, removed)
    if len(rows) == len(tomb):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    info = commit_generation(root, {**info, "skipped": int(store.manifest["skipped_count"])}, index, rows, tomb,
                             removed, same_faiss=None if len(new) else cur.path)
    back = len(cur.removed) - len(removed)
    log.info("index %s: %d rows added%s, %d in all, %s", root, len(new),
             f" ({back} removed earlier are back)" if back else "", info["rows"], info["kind"])
    if info["kind"] == "flat" and info.get("requested_kind") == "auto" and info["rows"] > EXACT_MAX:
        log.warning("index %s now holds %d rows, more than exact search suits (%d): `clipkd index compact` rebuilds "
                    "it as HNSW", root, info["rows"], EXACT_MAX)
    return info


COLUMNS = "columns.tsv"  # key<TAB>one value per column (an image list's extra columns), with a header


def _read_columns(root: Path) -> dict[str, dict[str, str]]:
    import csv

    f = root / COLUMNS
    if not f.is_file():
        return {}
    with f.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    names = rows[0][1:] if rows else []
    return {c: {r[0]: r[i + 1] for r in rows[1:] if len(r) > i + 1 and r[i + 1] != ""} for i, c in enumerate(names)}


def _append_columns(root: Path, source: Source) -> None:
    import csv
    import io

    if not source.columns:
        return
    have = _read_columns(root)
    for c, col in source.columns.items():
        have.setdefault(c, {}).update(col)
    names = sorted(have)
    keys = sorted({k for col in have.values() for k in col})
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["key", *names])
    for k in keys:
        w.writerow([k, *(have[c].get(k, "") for c in names)])
    write_text(root / COLUMNS, buf.getvalue())


def _append_labels(root: Path, source: Source) -> None:
    if not source.labels:
        return
    have = _read_labels(root / "labels.tsv")
    have.update(source.labels)
    write_text(root / "labels.tsv", "".join(f"{p}\t{lab}\n" for p, lab in have.items()))


def build_index(model: str | Path, images: str | Path, out: str | Path, kind: str = "auto",
                text_model: str | Path | None = None, device: str | None = "auto", batch_size: int = 64,
                workers: int | None = None, progress: bool = True, encoder: Encoder | None = None,
                precision: str = "auto", add: bool = False, images_root: str | Path | None = None) -> SearchIndex:
    """Embed ``images`` (a folder or an image list) with ``model`` into a new index at ``out``, or resume one.

    ``model``: a teacher spec, a ``clip-train`` run, or a distilled student (``text_model``: its teacher, for
    text queries). ``kind``: ``auto`` (exact up to :data:`EXACT_MAX` rows, HNSW above), ``flat``, ``hnsw``,
    ``ivf`` or ``ivfpq``. Killed midway, the same command resumes (finished shards are kept). An index of other
    images at ``out`` is refused unless ``add`` (what :func:`add_to_index` does). Rows are keyed relative to the
    collection root: ``images`` for a new index (a list's folder, a TSV's), the index's own for an added source
    (``images_root``: where that root is on this machine, when the index moved without its images beside it).
    """

    out = Path(out)
    _choose_kind(kind, 0)
    source = read_source(images)
    r = ranks()  # ranks of one job (torchrun/srun) embed their shares; rank 0 holds the folder and writes the index
    with exclusive(out, "search index") if r.zero else nullcontext():
        existing = read_json(out / "index.json", "index description") if (out / "index.json").is_file() else None
        here = relative(images, out)
        if existing is not None and not add and here not in existing.get("sources", []):
            raise ClipkdError(f"{out} holds an index of {existing.get('sources')} (relative to it), not of {here}; "
                              "add images with `clipkd index add`, or build into another `out`")
        if existing is not None and "images" in existing:
            root = Path(images_root).resolve() if images_root is not None else (out / existing["images"]).resolve()
            if not root.is_dir():
                raise ClipkdError(f"the collection root of index {out} is not at {root}: give where its images are "
                                  "on this machine (`--images-root`)")
        elif existing is not None:  # an index of clipkd before portable indexes: rows keyed by absolute path
            root = Path("/")
        else:
            root = source.root
        source = source.under(root)
        if encoder is None:
            from .encoder import load_encoder

            encoder = load_encoder(model, text_model, device, precision)
        enc = encoder
        if existing is not None and existing.get("identity") != enc.identity:
            raise ClipkdError(f"{out} holds an index built by '{existing.get('identity')}', not '{enc.identity}'; "
                              "use another `out`")
        store = embed_paths(enc, root, source.paths, out / "store", batch_size, workers, progress=progress,
                            opener=source.opener, fingerprint=getattr(source.opener, "fingerprint", None))
        if r.distributed:
            barrier()  # every rank's rows are in the store
            store = EmbeddingStore(out / "store")
        if r.zero:
            _append_labels(out, source)
            _append_columns(out, source)
            sources = [*(existing or {}).get("sources", []), here]
            info = _describe(model, text_model, enc, sources, out)
            if existing is None or "images" in existing:
                info["images"] = relative(root, out)
            if existing is not None and existing.get("requested_kind", existing.get("kind")) == kind and \
                    "generation" in existing:  # more images (or none) into the same index: appended
                keep = ("kind", "requested_kind", "params", "recall@10", "recall_rows")
                _append_faiss(out, store, {**info, **{k: existing[k] for k in keep if k in existing}}, source.paths)
            else:
                _write_faiss(out, store, kind, info, source.paths)
    barrier()  # rank 0 has written the index
    index = SearchIndex(out)
    index.encoder = enc
    return index


def _describe(model: str | Path, text_model: str | Path | None, enc: Encoder, sources: Sequence[str],
              out: Path) -> dict:
    from .encoder import is_student

    return {"format": INDEX_FORMAT, "model": _model_ref(model, out, "image"),
            "text_model": _model_ref(text_model, out, "text"),
            "identity": enc.identity, "embed_dim": enc.embed_dim, "preprocess": enc.preprocess_cfg.to_dict(),
            "student": is_student(model), "sources": sorted(set(sources))}


def index_store(out: str | Path, model: str | Path, kind: str = "auto", text_model: str | Path | None = None,
                device: str | None = "auto") -> SearchIndex:
    """Make ``out`` a search index over the embedding store already in ``out/store`` (made by ``model``; its rows
    keyed under the folder it records): for embeddings computed elsewhere, e.g. a benchmark's synthetic gallery."""

    out = Path(out)
    from .encoder import load_encoder

    store = EmbeddingStore(out / "store")
    enc = load_encoder(model, text_model, device)
    store.check_teacher(enc.identity, hint="the store was not made by this model")
    _choose_kind(kind, 0)  # a one-line error for an unknown kind, before the work
    with exclusive(out, "search index"):
        _write_faiss(out, store, kind, {**_describe(model, text_model, enc, [], out),
                                        "images": relative(store.images_root(), out)})
    return SearchIndex(out)


def append_store(index_dir: str | Path) -> SearchIndex:
    """Add to an index the rows of its store that its FAISS index lacks (embeddings written into ``store/`` by other
    means: ``import-npy``, a benchmark's synthetic rows), appended without a rebuild as a new generation."""
    out = Path(index_dir)
    index = SearchIndex(out)
    index.store.check_teacher(index.identity, hint="the store was not made by the index's model")
    with exclusive(out, "search index"):
        _append_faiss(out, EmbeddingStore(out / "store"), read_json(out / "index.json", "index description"), ())
    return SearchIndex(out)


def add_to_index(index_dir: str | Path, images: str | Path, device: str | None = "auto", batch_size: int = 64,
                 workers: int | None = None, progress: bool = True, precision: str = "auto",
                 images_root: str | Path | None = None) -> SearchIndex:
    """Embed new images into an index with the model that built it, and rebuild its FAISS index."""
    index = SearchIndex(index_dir, images_root)
    info = index.info
    return build_index(index.model, images, index_dir, info.get("requested_kind", info["kind"]),
                       index.text_model, device, batch_size, workers, progress, precision=precision, add=True,
                       images_root=images_root)


def remove_from_index(index_dir: str | Path, paths: Sequence[str], images_root: str | Path | None = None) -> int:
    """Drop ``paths`` (keys as the index lists them, or image paths under its collection root) from an index: their
    FAISS rows become tombstones that queries skip (no rebuild; :func:`compact_index` rewrites the index without
    them); returns how many rows left it. A running ``serve`` picks the new generation up."""

    root = Path(index_dir)
    index = SearchIndex(root, images_root)
    known = set(index.paths)
    wanted = {p if p in known else relative(p, index.images_root)
              for p in paths}
    unknown = sorted(p for p in wanted if p not in known)
    if unknown:
        raise ClipkdError(f"{len(unknown)} path(s) are not in index {root}, e.g. {unknown[:3]}")
    with exclusive(root, "search index"):
        cur = _current(root)  # what is on disk now, under the lock
        removed = cur.removed | wanted
        paths_now = index.store.paths
        tomb = _tombstones(cur.rows, paths_now, removed)
        if len(tomb) == len(cur.rows):  # refused before anything is written
            raise ClipkdError(f"index {root} would be empty: removing these would leave no image in it; nothing "
                              "was removed")
        info = read_json(root / "index.json", "index description")
        info = commit_generation(root, info, cur.index, cur.rows, tomb, removed, same_faiss=cur.path)
    if len(tomb) > COMPACT_SHARE * len(cur.rows):
        log.warning("index %s: %d of its %d FAISS rows are removed images that every query skips; `clipkd index "
                    "compact --index %s` rewrites it without them", root, len(tomb), len(cur.rows), root)
    return len(wanted - cur.removed)


def compact_index(index_dir: str | Path) -> SearchIndex:
    """Rewrite an index's FAISS file without its removed rows (their embeddings stay in the store, so adding them
    again costs no model pass); ``auto`` indexes choose their kind again for the rows they now hold."""
    root = Path(index_dir)
    index = SearchIndex(root)
    with exclusive(root, "search index"):
        info = read_json(root / "index.json", "index description")
        _write_faiss(root, index.store, info.get("requested_kind", info["kind"]), info)
    return SearchIndex(root)
