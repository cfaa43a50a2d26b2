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
    columns: dict[str, tuple[np.ndarray, list[str]]] | None = None  # name -> (code per store row, values)


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
                         _read_lines(d / "removed.txt"), d / "faiss.index", _read_codes(d, mmap))
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


CODES = "columns.json"  # in a generation: the filterable columns' values; col-<i>.npy: int32 code per store row


def _read_codes(d: Path, mmap: bool) -> dict[str, tuple[np.ndarray, list[str]]] | None:
    """A generation's columns (None: a generation of clipkd before coded columns)."""
    if not (d / CODES).is_file():
        return None
    names = read_json(d / CODES, "index columns")
    return {name: (np.load(d / f"col-{i}.npy", mmap_mode="r" if mmap else None), list(values))
            for i, (name, values) in enumerate(names.items())}


def column_codes(root: Path, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The index's filterable columns (``label`` from labels.tsv, an image list's others from columns.tsv) as one
    int32 code per store row (-1: none) and each column's values: what a server filters on and answers with, read
    memory-mapped, instead of a Python string per row."""
    cols = {"label": _read_labels(root / "labels.tsv"), **_read_columns(root)}
    out = {}
    for name, col in cols.items():
        if not col:
            continue
        values = sorted(set(col.values()))
        code = {v: i for i, v in enumerate(values)}
        out[name] = (np.fromiter((code.get(col.get(k), -1) for k in keys), np.int32, len(keys)), values)
    return out


def _current(root: Path) -> Generation | None:
    """The generation on disk now (under the writer's lock), or None for a folder with no index yet."""
    if not (root / "index.json").is_file():
        return None
    return read_generation(root, read_json(root / "index.json", "index description"))


def _link(src: Path, dst: Path) -> None:
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links: a copy
        shutil.copyfile(src, dst)


def commit_generation(root: Path, info: dict[str, Any], index: Any, rows: np.ndarray, tombstones: np.ndarray,
                      removed: set[str], same_faiss: Path | None = None,
                      columns: dict[str, tuple[np.ndarray, list[str]]] | None = None) -> dict[str, Any]:
    """Write the next generation (FAISS file, rows, tombstones, removed keys, coded columns) into ``gen/<N>/``, then
    name it in index.json (atomically: a reader sees the old generation or the new, never a mix), then prune all
    but the two newest. ``same_faiss``: the FAISS file is unchanged (a removal) and is hard-linked, not written
    again (and so are the columns when ``columns`` is None). Called under the index folder's lock."""
    import shutil

    faiss = _faiss()
    on_disk = read_json(root / "index.json", "index description") if (root / "index.json").is_file() else {}
    number = int(on_disk.get("generation", 0)) + 1
    d = root / GENERATIONS / str(number)
    if d.exists():  # what a killed writer left: no index.json names it
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if same_faiss is not None:
        _link(same_faiss, d / "faiss.index")
    else:
        atomic_write(d / "faiss.index", lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))
    write_npy(d / "rows.npy", np.asarray(rows, np.int64))
    write_npy(d / "tombstones.npy", np.asarray(tombstones, np.int64))
    write_text(d / "removed.txt", "".join(f"{p}\n" for p in sorted(removed)))
    if columns is None and same_faiss is not None and (same_faiss.parent / CODES).is_file():
        for f in same_faiss.parent.iterdir():
            if f.name == CODES or (f.name.startswith("col-") and f.suffix == ".npy"):
                _link(f, d / f.name)
    elif columns is not None:
        for i, (codes, _) in enumerate(columns.values()):
            write_npy(d / f"col-{i}.npy", np.asarray(codes, np.int32))
        write_json(d / CODES, {name: values for name, (_, values) in columns.items()})
    info = {**info, "generation": number, "rows": int(len(rows) - len(tombstones)), "tombstones": int(len(tombstones)),
            "removed": len(removed)}
    write_json(root / "index.json", info)
    for old in (root / GENERATIONS).iterdir():  # a server still reading generation N-1 keeps it
        if old.name.isdigit() and int(old.name) < number - 1:
            shutil.rmtree(old, ignore_errors=True)
    for legacy in ("faiss.npy", "rows.npy", "removed.txt"):  # the layout before generations
        (root / legacy).unlink(missing_ok=True)
    return info



def filter_terms(label: str | None, where: dict[str, str] | None) -> list[tuple[str, str]]:
    """The ``(column, value)`` terms a query's ``label`` and ``where`` ask for, every one of which must hold: a
    ``where`` label that differs from ``label`` is a second term on the same column, which no row meets."""
    terms = {("label", str(label))} if label is not None else set()
    terms |= {(c, str(v)) for c, v in (where or {}).items()}
    return sorted(terms)

class SearchIndex:
    """An index folder opened for search; ``encoder`` loads the model that made it (checked by identity). An index
    whose vectors live in Milvus opens as :class:`MilvusIndex`."""

    def __new__(cls, root: str | Path, images: str | Path | None = None) -> SearchIndex:
        if cls is SearchIndex and (Path(root) / "index.json").is_file():
            try:
                info = read_json(Path(root) / "index.json", "index description")
            except ClipkdError:
                info = None  # reported by __init__
            if isinstance(info, dict) and info.get("backend") == "milvus":
                return object.__new__(MilvusIndex)
        return object.__new__(cls)

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
        self.paths = self.store.keys()  # read a shard at a time as rows are asked for
        self.generation, self.index, self.rows = gen.number, gen.index, gen.rows
        self.tombstones, self.removed = gen.tombstones, gen.removed
        if len(self.rows) and int(self.rows.max()) >= len(self.paths):
            raise ClipkdError(f"index {self.root} is damaged: its FAISS rows name store rows the store does not hold; "
                              f"{rebuild}")
        self.live = np.zeros(len(self.paths), dtype=bool)  # store rows a query can return
        self.live[self.rows] = True
        self.live[self.rows[self.tombstones]] = False
        # filterable columns, coded per store row (an index of clipkd before coded columns: coded here)
        self.codes = gen.columns if gen.columns is not None else column_codes(self.root, self.paths)
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
            _set_nprobe_from(self.index, self.info)

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
    def columns(self) -> list[str]:
        """What rows can be filtered on: ``label`` (when the images have labels) and an image list's other columns."""
        return list(self.codes)

    def label(self, row: int) -> str | None:
        """The label of store row ``row`` (None: none)."""
        return self.value("label", row)

    def value(self, column: str, row: int) -> str | None:
        """Column ``column`` of store row ``row`` (None: the row has no value there, or the index no such column)."""
        codes, values = self.codes.get(column, (None, None))
        if codes is None or row >= len(codes) or codes[row] < 0:
            return None
        return values[int(codes[row])]

    def _check_columns(self, want: list[tuple[str, str]]) -> None:
        unknown = sorted(c for c, _ in want if c not in self.codes)
        if unknown:
            raise ClipkdError(f"index {self.root} has no column {unknown[0]!r} to filter on (it has: "
                              f"{', '.join(self.codes) or 'none'})")

    def allowed(self, label: str | None = None, where: dict[str, str] | None = None) -> np.ndarray | None:
        """The FAISS positions whose rows match ``label`` and every ``column: value`` of ``where`` (None: no
        filter). A column the index does not have is a one-line error naming those it has."""
        want = filter_terms(label, where)
        if not want:
            return None
        cache = self.__dict__.setdefault("_allowed", {})
        frozen = tuple(want)
        if frozen in cache:
            return cache[frozen]
        self._check_columns(want)
        ok = np.ones(len(self.rows), dtype=bool)
        ok[self.tombstones] = False
        for c, v in want:
            codes, values = self.codes[c]
            if str(v) not in values:
                ok[:] = False
                break
            ok &= np.asarray(codes)[self.rows] == values.index(str(v))
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
            scores, pos = self._search(q, min(k, max(1, len(self))))
        elif not len(allowed):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        elif len(allowed) * 10 < len(self):
            scores, pos = self._exact(q, k, allowed)
        else:
            want = min(k, len(allowed))
            scores, pos = self._search(q, want, self._params(self._selector(allowed), k,
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
        scores, pos = self._search(q, k, self._params(self._not_removed[1], k))
        if (pos < 0).any():
            more = min(int(self.index.ntotal), k + len(self.tombstones))
            s2, p2 = self.index.search(q, more)
            dead = np.isin(p2, self.tombstones) | (p2 < 0)
            order = np.argsort(dead, axis=1, kind="stable")[:, :k]
            scores, pos = np.take_along_axis(s2, order, 1), np.where(
                np.take_along_axis(dead, order, 1), -1, np.take_along_axis(p2, order, 1))
        return scores, pos

    def _search(self, q: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``k`` positions; an IVF-PQ index's candidates (``rerank`` times ``k``) re-ranked exactly from
        the memory-mapped store (its codes alone rank coarsely)."""
        return rerank_search(self.index, q, k, self.store, self.rows,
                             int(self.info.get("params", {}).get("rerank", 1)), params)

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` among FAISS positions ``allowed``, from the stored embeddings (a chunk at a time)."""
        scores, at = exact_search(self.store, self.rows[allowed], q, k)
        return scores, np.where(at >= 0, allowed[np.clip(at, 0, None)], -1)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """One query's results as dicts: ``id`` (the store row), ``path``, ``score``, ``label``."""
        out = []
        for s, r in zip(scores.tolist(), rows.tolist(), strict=True):
            if r < 0:
                continue
            path = self.paths[r]
            score = min(1.0, max(-1.0, float(s)))  # a cosine: fp16 rows and FAISS rounding can pass 1 by 1e-5
            out.append({"id": int(r), "path": path, "score": round(score, 6), "label": self.label(r)})
        return out

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of a row (for "search by this result")."""
        if not self.is_live(row):
            raise KeyError(row)
        return self.store.gather(np.array([row]))[0].astype(np.float32)

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


class MilvusIndex(SearchIndex):
    """An index folder whose vectors live in a Milvus collection (:mod:`clipkd.search.milvus`): searched and
    filtered inside Milvus; keys, labels, the model and the images as in any index folder."""

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        from . import milvus

        self.root = Path(root)
        self.info = read_json(self.root / "index.json", "index description")
        missing = [k for k in ("identity", "model", "embed_dim", "kind", "milvus") if k not in self.info]
        if self.info.get("format") != INDEX_FORMAT or missing:
            raise ClipkdError(f"index {self.root} is damaged: index.json lacks {missing}; {REBUILD}")
        self.client, self.collection = milvus.open_index(self.root, self.info)
        self.store = EmbeddingStore(self.root / "store")
        self.paths = self.store.keys()
        self.generation = int(self.info.get("generation", 0))
        self.removed = milvus.read_removed(self.root)
        inserted = min(int(self.info["milvus"]["inserted"]), len(self.store))
        self.live = np.zeros(len(self.store), dtype=bool)
        self.live[:inserted] = True
        if self.removed:
            self.live[:inserted] &= ~np.fromiter((k in self.removed for k in self.paths[:inserted]), bool, inserted)
        self.rows = np.flatnonzero(self.live)
        self.tombstones = np.zeros(0, np.int64)
        self.codes = column_codes(self.root, self.paths)
        self.images_root = Path(images).resolve() if images is not None else \
            (self.root / self.info.get("images", "/")).resolve()
        self.encoder = None

    def __len__(self) -> int:
        return len(self.rows)

    def allowed(self, label: str | None = None, where: dict[str, str] | None = None) -> str | None:  # type: ignore[override]
        """A Milvus filter expression for ``label`` and ``where`` (None: no filter); unknown columns as
        :meth:`SearchIndex.allowed`."""
        from . import milvus

        want = filter_terms(label, where)
        if not want:
            return None
        self._check_columns(want)
        return milvus.expression(want)

    def search_vectors(self, queries: np.ndarray, k: int = 10,  # type: ignore[override]
                       allowed: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        from . import milvus

        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.info["embed_dim"])
        return milvus.search(self.client, self.collection, q, min(k, max(1, len(self))),
                             self.info["milvus"].get("params", {}), allowed)


def _milvus_kind(kind: str, n: int, uri: str) -> str:
    if kind == "auto":
        return "flat" if n <= EXACT_MAX else "ivf"
    if kind not in ("flat", "ivf"):
        raise ClipkdError(f"`kind`={kind} is not offered with `backend`=milvus here: flat (exact) or ivf (IVF_FLAT), "
                          "what Milvus Lite keeps")
    return kind


def _write_milvus(root: Path, store: EmbeddingStore, kind: str, info: dict[str, Any], existing: dict | None,
                  uri: str, collection: str, restore: Sequence[str] = ()) -> dict[str, Any]:
    """Insert the store's rows the collection lacks (all of them into a new collection, or again when the store
    lost a damaged shard), put back removed rows added again, and move index.json to the next generation."""
    from . import milvus

    client = milvus.connect(uri)
    old = (existing or {}).get("milvus", {})
    inserted = int(old.get("inserted", 0)) if old.get("collection") == collection else 0
    removed = milvus.read_removed(root) if inserted else set()
    exists = milvus.check_collection(client, collection, info["identity"], int(info["embed_dim"]), uri)
    chosen = (existing or {}).get("kind") if exists and inserted else _milvus_kind(kind, len(store), uri)
    if exists and (not inserted or inserted > len(store)):  # another index's rows, or a store that lost a shard
        client.drop_collection(collection)
        exists, inserted, removed = False, 0, set()
    params = old.get("params", {}) if exists else \
        milvus.create_collection(client, collection, info["identity"], int(info["embed_dim"]), chosen, len(store))
    codes = column_codes(root, store.keys())
    back = sorted(removed & set(restore))
    if back:
        milvus.insert_rows(client, collection, store, store.rows(back), codes)
        removed -= set(back)
    new = np.arange(inserted, len(store), dtype=np.int64)
    milvus.insert_rows(client, collection, store, new, codes)
    write_text(milvus.removed_file(root), "".join(f"{k}\n" for k in sorted(removed)))
    rows = len(store) - len(removed)
    recall = 1.0
    if chosen != "flat":
        client.flush(collection)
        pick = np.sort(np.random.default_rng(0).choice(len(store), min(100, len(store)), replace=False))
        q = store.gather(pick).astype(np.float32)
        _, want = exact_search(store, np.arange(len(store)), q, 10)
        recall = _overlap(want, milvus.search(client, collection, q, 10, params, None)[1])
    number = int((existing or {}).get("generation", 0)) + 1
    info = {**info, "backend": "milvus", "kind": chosen, "requested_kind": kind, "params": params,
            "milvus": {"uri": milvus.record_uri(uri, root), "collection": collection, "inserted": len(store),
                       "params": params},
            "skipped": int(store.manifest["skipped_count"]), "recall@10": round(recall, 4), "generation": number,
            "rows": rows, "tombstones": 0, "removed": len(removed)}
    write_json(root / "index.json", info)
    log.info("index %s: %d rows in Milvus collection %s at %s (%s), %d inserted now", root, rows, collection, uri,
             chosen, len(new) + len(back))
    return info


def _remove_milvus(root: Path, index: MilvusIndex, wanted: set[str]) -> int:
    from . import milvus

    info = read_json(root / "index.json", "index description")
    removed = milvus.read_removed(root)
    gone = sorted(wanted - removed)
    rows = index.store.rows(gone)
    if len(index) - len(gone) <= 0:
        raise ClipkdError(f"index {root} would be empty: removing these would leave no image in it; nothing was "
                          "removed")
    milvus.delete_rows(index.client, index.collection, rows.tolist())
    removed |= wanted
    write_text(milvus.removed_file(root), "".join(f"{k}\n" for k in sorted(removed)))
    write_json(root / "index.json", {**info, "generation": int(info.get("generation", 0)) + 1,
                                     "rows": int(info["rows"]) - len(gone), "removed": len(removed)})
    return len(gone)


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


HNSW_M = 32
RERANK = 8  # an IVF-PQ search re-ranks at least RERANK x k candidates exactly from the store
RERANK_MAX = 128  # ... and up to this many x k where the PQ codes alone rank too coarsely (measured at build)
TARGET_RECALL = 0.95  # an IVF index's nprobe is the smallest reaching this recall@10 at build (measured)
TRAIN_MAX = 200_000  # rows an IVF quantizer trains on (a sample: the build's memory is not the rows')
CHUNK = 65_536  # rows read and added at a time


def parse_memory(text: str | int | None) -> int | None:
    """Bytes of a budget as ``4G``, ``512M``, ``4GiB``, ``2.5G`` or a number of bytes (None: none given)."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise ClipkdError(f"`max_memory`={text!r} is not a size (e.g. 4G, 512M)") from None
    if value <= 0:
        raise ClipkdError(f"`max_memory`={text!r} must be more than nothing")
    return int(value * scale)


def default_budget() -> int:
    """The memory an index may take when no budget is given: half the machine's."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _nlist(n: int) -> int:
    return int(max(1, min(4 * np.sqrt(n), n // 39 if n >= 39 else 1, 4096)))


def _pq_m(d: int) -> list[int]:
    """PQ code sizes (bytes per row) that divide ``d`` into sub-vectors of at least 4 dimensions, largest first."""
    return [m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and d // m >= min(4, d)]


def index_bytes(kind: str, n: int, d: int, m: int | None = None) -> int:
    """What a FAISS index of ``kind`` over ``n`` ``d``-dim rows holds in memory while it is built (its vectors or
    codes, graph links, list ids and quantizer), plus the build's working set (one chunk, the training sample)."""
    work = min(n, CHUNK) * d * 6 + (min(n, TRAIN_MAX) * d * 4 if kind in ("ivf", "ivfpq") else 0)
    if kind == "flat":
        return n * d * 4 + work
    if kind == "hnsw":
        return int(n * (d * 4 + HNSW_M * 2 * 4 * 1.05 + 16)) + work
    lists = _nlist(n) * d * 4 * 2 + 8 * n
    if kind == "ivf":
        return n * d * 4 + lists + work
    return n * (m or _pq_m(d)[0]) + lists + 256 * d * 4 + work


def plan_index(kind: str, n: int, d: int, max_memory: int | None = None) -> dict[str, Any]:
    """The FAISS index to build for ``n`` rows under a memory budget, as autofaiss chooses: ``auto`` is exact
    (``flat``) up to :data:`EXACT_MAX` rows, HNSW while it fits, else IVF-PQ with the largest codes that fit
    (re-ranked exactly from the memory-mapped store at query time). An explicit kind that does not fit, or a budget
    too small for any, is one line naming the smallest budget that works."""
    if kind not in KINDS:
        raise ClipkdError(f"unknown index kind '{kind}' (choose from {', '.join(KINDS)})")
    budget = max_memory or default_budget()
    options = [("flat", None), ("hnsw", None), ("ivf", None), *(("ivfpq", m) for m in _pq_m(d))]
    if kind == "auto":
        wanted = ([("flat", None)] if n <= EXACT_MAX else []) + [("hnsw", None)] + \
            [o for o in options if o[0] == "ivfpq"]
    else:
        wanted = [o for o in options if o[0] == kind]
    for k, m in wanted:
        need = index_bytes(k, n, d, m)
        if need <= budget:
            return {"kind": k, "m": m, "bytes": need, "budget": budget}
    smallest = min(index_bytes(k, n, d, m) for k, m in wanted)
    what = "an index" if kind == "auto" else f"a {kind} index"
    raise ClipkdError(f"{what} of {n:,} rows of {d} dims does not fit in `max_memory`={_mib(budget)}: the smallest "
                      f"takes {_mib(smallest)}" + ("" if kind == "auto" else " (or choose `kind`=auto)"))


def _mib(b: int) -> str:
    return f"{b / (1 << 30):.2f} GiB" if b >= 1 << 30 else f"{b / (1 << 20):.0f} MiB"


def new_faiss(plan: dict[str, Any], n: int, d: int) -> tuple[Any, dict[str, Any]]:
    """An empty (untrained) FAISS inner-product index of ``plan`` (:func:`plan_index`) and its search parameters."""
    faiss = _faiss()
    kind = plan["kind"]
    if kind == "flat":
        return faiss.IndexFlatIP(d), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        return index, {"M": HNSW_M, "efSearch": 64}
    nlist = _nlist(n)
    if n < (256 if kind == "ivfpq" else nlist):
        raise ClipkdError(f"{n} images are too few for a {kind} index; use `kind`=flat")
    # a graph over the centroids past a thousand lists (IVF-HNSW, as autofaiss builds): assigning ten million rows
    # to 4,096 centroids exactly would cost most of the build
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 1024 else f"IVF{nlist}"
    m = plan.get("m") or _pq_m(d)[0]
    index = faiss.index_factory(d, coarse + (",Flat" if kind == "ivf" else f",PQ{m}x8"), faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    params: dict[str, Any] = {"nlist": nlist, "nprobe": min(nlist, 16)}
    if kind == "ivfpq":
        params.update(m=m, rerank=RERANK)
    return index, params


def _set_nprobe(index: Any, nprobe: int) -> None:
    _faiss().extract_index_ivf(index).nprobe = nprobe


def fill_faiss(index: Any, chunks: Any, sample: np.ndarray | None) -> Any:
    """Train ``index`` on ``sample`` (IVF quantizers) and add ``chunks`` (float32 arrays) one at a time."""
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for part in chunks:
        index.add(np.ascontiguousarray(part, dtype=np.float32))
    return index


def make_faiss(vectors: np.ndarray, kind: str, seed: int = 0,
               max_memory: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index of ``kind`` over in-memory ``vectors`` (N, D) float32, and its search
    parameters (an index folder's build streams its store instead: :func:`index_store`)."""
    n, d = vectors.shape
    plan = plan_index(kind, n, d, max_memory)
    index, params = new_faiss(plan, n, d)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, min(n, TRAIN_MAX), replace=False))] if not index.is_trained else None
    fill_faiss(index, (vectors[i:i + CHUNK] for i in range(0, n, CHUNK)), sample)
    if "nprobe" in params:
        _set_nprobe(index, params["nprobe"])
    return index, params


def exact_search(store: EmbeddingStore | np.ndarray, rows: np.ndarray, q: np.ndarray,
                 k: int, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, positions into ``rows``) of unit queries ``q`` among store rows ``rows``, read
    ``step`` rows at a time (default: as many as keep one chunk's scores near 64 MiB; memory flat in the rows);
    ``store`` may be an in-memory array of rows instead."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    best_s = np.zeros((len(q), 0), np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    step = int(step or max(64, min(4 * CHUNK, (1 << 24) // max(1, len(q)))))
    parts = store.chunks(rows, step) if isinstance(store, EmbeddingStore) else \
        ((rows[i:i + step], store[rows[i:i + step]]) for i in range(0, len(rows), step))
    for start, (_, v) in zip(range(0, len(rows), step), parts, strict=True):
        sims = q @ np.asarray(v, dtype=np.float32).T
        kk = min(k, sims.shape[1])
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    if best_s.shape[1] < k:  # fewer rows than k: padded as FAISS pads
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return best_s, best_i


def rerank_search(index: Any, q: np.ndarray, k: int, store: EmbeddingStore | np.ndarray, rows: np.ndarray,
                  rerank: int = 1, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-``k`` (scores, positions); with ``rerank`` > 1 the top ``rerank * k`` candidates are scored exactly
    against the stored rows (``rows``: FAISS position → store row) and the best ``k`` kept."""
    if rerank <= 1:
        return index.search(q, k, params=params)
    kk = min(int(index.ntotal), rerank * k)
    _, pos = index.search(q, kk, params=params)
    valid = pos >= 0
    flat = rows[np.clip(pos, 0, None)].reshape(-1)
    v = store.gather(flat) if isinstance(store, EmbeddingStore) else store[flat]
    exact = np.einsum("qkd,qd->qk", np.asarray(v, np.float32).reshape(len(q), kk, -1), q)
    exact[~valid] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    got = np.take_along_axis(pos, order, 1)
    return np.take_along_axis(exact, order, 1), np.where(np.take_along_axis(valid, order, 1), got, -1)


def recall_at_10(index: Any, vectors: np.ndarray, queries: int = 1000, seed: int = 0, rerank: int = 1) -> float:
    """Recall@10 of ``index`` against exact inner-product search, on stored vectors used as queries (in memory)."""
    n = len(vectors)
    q = vectors[np.random.default_rng(seed).choice(n, min(queries, n), replace=False)]
    k = min(10, n)
    _, want = exact_search(vectors, np.arange(n), q, k)
    _, got = rerank_search(index, q, k, vectors, np.arange(n), rerank)
    return _overlap(want, got)


def _overlap(want: np.ndarray, got: np.ndarray) -> float:
    k = want.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want.tolist(), got.tolist(), strict=True)]))


def tune(index: Any, params: dict[str, Any], store: EmbeddingStore, rows: np.ndarray,
         seed: int = 0) -> tuple[float, int]:
    """Recall@10 against exact search on stored rows as queries (a hundred to a thousand, fewer as rows grow: the
    exact side reads every row), choosing an IVF index's ``nprobe`` or an HNSW graph's ``efSearch`` as the
    smallest reaching :data:`TARGET_RECALL` (recorded in ``params``); returns (recall, queries)."""
    n = len(rows)
    nq = int(np.clip(2e11 / max(1, n * store.embed_dim), 100, 1000))
    pick = np.sort(np.random.default_rng(seed).choice(n, min(nq, n), replace=False))
    q = store.gather(rows[pick]).astype(np.float32)
    k = min(10, n)
    _, want = exact_search(store, rows, q, k)
    rerank = int(params.get("rerank", 1))
    if "efSearch" in params:  # HNSW: the smallest graph walk that reaches the target
        for ef in (64, 96, 128, 192, 256):
            index.hnsw.efSearch = ef
            recall = _overlap(want, index.search(q, k)[1])
            params["efSearch"] = ef
            if recall >= TARGET_RECALL:
                break
        return recall, len(q)
    if "nprobe" not in params:
        return _overlap(want, rerank_search(index, q, k, store, rows, rerank)[1]), len(q)
    nlist = params["nlist"]
    probes = sorted({min(nlist, p) for p in (8, 16, 32, 64, 128, 256, 512)})
    # IVF-PQ: more lists stop paying once the true neighbours are among the probed rows but ranked below the re-rank
    # cut by their coarse codes; then re-rank more candidates (cheap reads from the store) before probing further
    factors = [f for f in (RERANK, 16, 32, 64, RERANK_MAX) if f >= rerank] if "rerank" in params else [1]
    recall = 0.0
    for factor in factors:
        last = -1.0
        for nprobe in probes:
            _set_nprobe(index, nprobe)
            recall = _overlap(want, rerank_search(index, q, k, store, rows, factor)[1])
            params["nprobe"] = nprobe
            if "rerank" in params:
                params["rerank"] = factor
            if recall >= TARGET_RECALL:
                return recall, len(q)
            if recall - last < 0.01 and factor < factors[-1]:
                break  # probing more lists no longer pays at this re-rank depth
            last = recall
    return recall, len(q)


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
                 restore: Sequence[str] = (), max_memory: int | None = None) -> dict[str, Any]:
    """Build the FAISS index over the store's rows that are not removed (``restore``: keys added again, no longer
    removed) under a memory budget, streaming the store a chunk at a time (an IVF quantizer trains on a sample),
    and commit it as the next generation."""
    import time

    t0 = time.perf_counter()
    removed = _removed_now(root) - set(restore)
    keys = store.keys()
    if removed:
        keep = np.flatnonzero(~np.fromiter((p in removed for p in keys), bool, len(keys))).astype(np.int64)
    else:
        keep = np.arange(len(store), dtype=np.int64)
    if not len(keep):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    budget = max_memory if max_memory is not None else info.get("max_memory")
    plan = plan_index(kind, len(keep), store.embed_dim, budget)
    index, params = new_faiss(plan, len(keep), store.embed_dim)
    sample = None
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = store.gather(keep[np.sort(rng.choice(len(keep), min(len(keep), TRAIN_MAX), replace=False))])
        log.info("index %s: training a %s quantizer on %d of %d rows", root, plan["kind"], len(sample), len(keep))
    fill_faiss(index, _progress((v for _, v in store.chunks(keep, CHUNK)), len(keep), f"indexing {root.name}"),
               sample)
    del sample
    recall, queries = (1.0, 0) if plan["kind"] == "flat" else tune(index, params, store, keep)
    info = {**info, "kind": plan["kind"], "requested_kind": kind, "params": params,
            "skipped": int(store.manifest["skipped_count"]), "recall@10": round(recall, 4),
            "recall_rows": int(len(keep)), "recall_queries": queries, "index_bytes": int(plan["bytes"]),
            "build_s": round(time.perf_counter() - t0, 1), **({"max_memory": budget} if budget else {})}
    info = commit_generation(root, info, index, keep, np.zeros(0, np.int64), removed,
                             columns=column_codes(root, keys))
    log.info("index %s: %d rows, %s, recall@10 vs exact %.3f", root, len(keep), plan["kind"], recall)
    return info


def _progress(parts: Any, total: int, what: str) -> Any:
    """``parts`` (arrays) passed through, with a progress bar counting their rows."""
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="row", unit_scale=True, disable=total < 4 * CHUNK) as bar:
        for part in parts:
            yield part
            bar.update(len(part))


def _tombstones(rows: np.ndarray, paths: Sequence[str], removed: set[str]) -> np.ndarray:
    """The FAISS positions whose store rows are removed keys."""
    if not removed:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.fromiter((paths[r] in removed for r in rows.tolist()), bool, len(rows)))


def _append_faiss(root: Path, store: EmbeddingStore, info: dict[str, Any], restore: Sequence[str]) -> dict[str, Any]:
    """Add the store's rows that the FAISS index lacks to it (flat, IVF and IVF-PQ append to their lists with the
    trained quantizer, HNSW links them into its graph), a chunk at a time: no rebuild. Keys in ``restore`` are no
    longer removed."""
    cur = _current(root)
    if cur is None or cur.path is None or (len(cur.rows) and int(cur.rows.max()) >= len(store)):
        # no index yet, one of clipkd before generations, or a store that lost a damaged shard: rebuilt
        return _write_faiss(root, store, info.get("requested_kind", info["kind"]), info, restore)
    removed = cur.removed - set(restore)
    keys = store.keys()
    listed = np.zeros(len(store), dtype=bool)
    listed[cur.rows] = True
    new = np.flatnonzero(~listed)
    if removed:
        new = new[~np.fromiter((keys[r] in removed for r in new.tolist()), bool, len(new))]
    index = cur.index
    _set_nprobe_from(index, info)
    for _, part in store.chunks(new, CHUNK):
        index.add(part)
    rows = np.concatenate([cur.rows, new]).astype(np.int64)
    tomb = _tombstones(rows, keys, removed)
    if len(rows) == len(tomb):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    info = commit_generation(root, {**info, "skipped": int(store.manifest["skipped_count"])}, index, rows, tomb,
                             removed, same_faiss=None if len(new) else cur.path,
                             columns=column_codes(root, keys) if len(new) or restore else None)
    back = len(cur.removed) - len(removed)
    log.info("index %s: %d rows added%s, %d in all, %s", root, len(new),
             f" ({back} removed earlier are back)" if back else "", info["rows"], info["kind"])
    if info["kind"] == "flat" and info.get("requested_kind") == "auto" and info["rows"] > EXACT_MAX:
        log.warning("index %s now holds %d rows, more than exact search suits (%d): `clipkd index compact` rebuilds "
                    "it as HNSW", root, info["rows"], EXACT_MAX)
    return info


def _set_nprobe_from(index: Any, info: dict[str, Any]) -> None:
    if info.get("kind") in ("ivf", "ivfpq"):
        _set_nprobe(index, int(info.get("params", {}).get("nprobe", 16)))


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
                precision: str = "auto", add: bool = False, images_root: str | Path | None = None,
                max_memory: int | str | None = None, backend: str = "faiss", uri: str | None = None,
                collection: str | None = None) -> SearchIndex:
    """Embed ``images`` (a folder or an image list) with ``model`` into a new index at ``out``, or resume one.

    ``model``: a teacher spec, a ``clip-train`` run, or a distilled student (``text_model``: its teacher, for
    text queries). ``kind``: ``auto`` (exact up to :data:`EXACT_MAX` rows, HNSW while it fits ``max_memory``,
    IVF-PQ beyond: :func:`plan_index`), ``flat``, ``hnsw``, ``ivf`` or ``ivfpq``; ``max_memory`` (bytes or
    ``"4G"``; default half the machine's) bounds the build, which streams the store. ``backend="milvus"``: the
    vectors go to collection ``collection`` (default: the index folder's name) of the Milvus at ``uri`` (a file:
    Milvus Lite; ``http://host:19530``: a server) instead of a FAISS file (:mod:`clipkd.search.milvus`). Killed
    midway, the same command resumes (finished shards are kept; a half-written FAISS generation is never named).
    An index of other images at ``out`` is refused unless ``add`` (what :func:`add_to_index` does). Rows are keyed
    relative to the collection root: ``images`` for a new index (a list's folder, a TSV's), the index's own for an
    added source (``images_root``: where that root is on this machine, when the index moved without its images
    beside it).
    """

    out = Path(out)
    budget = parse_memory(max_memory)
    plan_index(kind, 1, 1)  # a one-line error for an unknown kind, before the work
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
        budget = budget or (existing or {}).get("max_memory")
        milvus_at = _milvus_target(out, existing, backend, uri, collection)
        if milvus_at is None:
            plan_index(kind, len(source.paths) + int((existing or {}).get("rows", 0)), enc.embed_dim, budget)
        else:  # reachable, and no collection of another model, before any embedding
            from . import milvus

            _milvus_kind(kind, 0, milvus_at[0])
            milvus.check_collection(milvus.connect(milvus_at[0]), milvus_at[1], enc.identity, enc.embed_dim,
                                    milvus_at[0])
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
            if budget:
                info["max_memory"] = budget
            if existing is None or "images" in existing:
                info["images"] = relative(root, out)
            if milvus_at is not None:
                _write_milvus(out, store, kind, info, existing, milvus_at[0], milvus_at[1], source.paths)
            elif existing is not None and existing.get("requested_kind", existing.get("kind")) == kind and \
                    "generation" in existing:  # more images (or none) into the same index: appended
                keep = ("kind", "requested_kind", "params", "recall@10", "recall_rows", "recall_queries",
                        "index_bytes", "build_s")
                _append_faiss(out, store, {**info, **{k: existing[k] for k in keep if k in existing}}, source.paths)
            else:
                _write_faiss(out, store, kind, info, source.paths, budget)
    barrier()  # rank 0 has written the index
    index = SearchIndex(out)
    index.encoder = enc
    return index


def _milvus_target(out: Path, existing: dict | None, backend: str, uri: str | None,
                   collection: str | None) -> tuple[str, str] | None:
    """(URI, collection) of an index whose vectors go to Milvus (given, or recorded by the index), else None."""
    from . import milvus

    if backend not in ("faiss", "milvus"):
        raise ClipkdError(f"unknown `backend`={backend!r} (faiss or milvus)")
    if existing is not None and existing.get("backend") == "milvus":
        rec = existing["milvus"]
        given = (uri if milvus.is_remote(uri) else str(Path(uri).resolve())) if uri else None
        return given or milvus.resolve_uri(rec["uri"], out), collection or rec["collection"]
    if backend == "faiss":
        if uri or collection:
            raise ClipkdError("`uri` and `collection` are for `backend`=milvus")
        return None
    if existing is not None:
        raise ClipkdError(f"{out} holds a FAISS index; build the Milvus one into another `out`")
    if not uri:
        raise ClipkdError("`backend`=milvus needs `uri`: a Milvus Lite file (e.g. index.db) or http://host:19530")
    name = collection or "".join(c if c.isalnum() else "_" for c in out.resolve().name)
    if not name[:1].isalpha() and not name.startswith("_"):
        name = f"clipkd_{name}"
    return (uri if milvus.is_remote(uri) else str(Path(uri).resolve())), name


def _describe(model: str | Path, text_model: str | Path | None, enc: Encoder, sources: Sequence[str],
              out: Path) -> dict:
    from .encoder import is_student

    return {"format": INDEX_FORMAT, "model": _model_ref(model, out, "image"),
            "text_model": _model_ref(text_model, out, "text"),
            "identity": enc.identity, "embed_dim": enc.embed_dim, "preprocess": enc.preprocess_cfg.to_dict(),
            "student": is_student(model), "sources": sorted(set(sources))}


def index_store(out: str | Path, model: str | Path, kind: str = "auto", text_model: str | Path | None = None,
                device: str | None = "auto", max_memory: int | str | None = None, backend: str = "faiss",
                uri: str | None = None, collection: str | None = None) -> SearchIndex:
    """Make ``out`` a search index over the embedding store already in ``out/store`` (made by ``model``; its rows
    keyed under the folder it records): for embeddings computed elsewhere, e.g. a benchmark's synthetic gallery.
    The store is streamed: memory stays within ``max_memory`` (:func:`plan_index`, checked before the work);
    ``backend="milvus"``: into a Milvus collection, as :func:`build_index`."""

    out = Path(out)
    from .encoder import load_encoder

    budget = parse_memory(max_memory)
    store = EmbeddingStore(out / "store")
    enc = load_encoder(model, text_model, device)
    store.check_teacher(enc.identity, hint="the store was not made by this model")
    _check_dim(store, enc.embed_dim, out)
    info = {**_describe(model, text_model, enc, [], out), "images": relative(store.images_root(), out)}
    target = _milvus_target(out, None, backend, uri, collection)
    if target is not None:
        from . import milvus

        _milvus_kind(kind, 0, target[0])
        milvus.check_collection(milvus.connect(target[0]), target[1], enc.identity, enc.embed_dim, target[0])
        with exclusive(out, "search index"):
            _write_milvus(out, store, kind, info, None, *target)
        return SearchIndex(out)
    plan_index(kind, len(store), store.embed_dim, budget)  # one line before the work: a kind or budget that fails
    with exclusive(out, "search index"):
        _write_faiss(out, store, kind, info, max_memory=budget)
    return SearchIndex(out)


def _check_dim(store: EmbeddingStore, dim: int, out: Path) -> None:
    if store.embed_dim != dim:
        raise ClipkdError(f"store {store.root} holds {store.embed_dim}-d embeddings, index {out} {dim}-d ones: "
                          "they are of different models")


def append_store(index_dir: str | Path) -> SearchIndex:
    """Add to an index the rows of its store that its FAISS index lacks (embeddings written into ``store/`` by other
    means: ``import-npy``, a benchmark's synthetic rows), appended without a rebuild as a new generation."""
    out = Path(index_dir)
    info, store, _ = _writer_view(out)
    store.check_teacher(info["identity"], hint="the store was not made by the index's model")
    _check_dim(store, int(info["embed_dim"]), out)
    if info.get("backend") == "milvus":
        from . import milvus

        with exclusive(out, "search index"):
            _write_milvus(out, EmbeddingStore(out / "store"), info["requested_kind"], info, info,
                          milvus.resolve_uri(info["milvus"]["uri"], out), info["milvus"]["collection"])
        return SearchIndex(out)
    with exclusive(out, "search index"):
        _append_faiss(out, EmbeddingStore(out / "store"), read_json(out / "index.json", "index description"), ())
    return SearchIndex(out)


def add_to_index(index_dir: str | Path, images: str | Path, device: str | None = "auto", batch_size: int = 64,
                 workers: int | None = None, progress: bool = True, precision: str = "auto",
                 images_root: str | Path | None = None) -> SearchIndex:
    """Embed new images into an index with the model that built it; their rows are appended to its vectors."""
    root = Path(index_dir)
    info, _, _ = _writer_view(root)
    return build_index(_resolve_ref(info["model"], root), images, index_dir, info.get("requested_kind", info["kind"]),
                       _resolve_ref(info.get("text_model"), root), device, batch_size, workers, progress,
                       precision=precision, add=True, images_root=images_root)


def remove_from_index(index_dir: str | Path, paths: Sequence[str], images_root: str | Path | None = None) -> int:
    """Drop ``paths`` (keys as the index lists them, or image paths under its collection root) from an index: their
    FAISS rows become tombstones that queries skip (no rebuild; :func:`compact_index` rewrites the index without
    them); returns how many rows left it. A running ``serve`` picks the new generation up."""

    root = Path(index_dir)
    info, store, images = _writer_view(root, images_root)
    known = set(store.paths)
    wanted = {p if p in known else relative(p, images)
              for p in paths}
    unknown = sorted(p for p in wanted if p not in known)
    if unknown:
        raise ClipkdError(f"{len(unknown)} path(s) are not in index {root}, e.g. {unknown[:3]}")
    if info.get("backend") == "milvus":
        with exclusive(root, "search index"):
            return _remove_milvus(root, SearchIndex(root, images_root), wanted)
    with exclusive(root, "search index"):
        cur = _current(root)  # what is on disk now, under the lock
        removed = cur.removed | wanted
        paths_now = store.paths
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


def compact_index(index_dir: str | Path, max_memory: int | str | None = None) -> SearchIndex:
    """Rewrite an index's FAISS file without its removed rows (their embeddings stay in the store, so adding them
    again costs no model pass); ``auto`` indexes choose their kind again for the rows they now hold (under
    ``max_memory``, or the budget the index was built with)."""
    root = Path(index_dir)
    info, store, _ = _writer_view(root)
    budget = parse_memory(max_memory)
    if info.get("backend") == "milvus":
        log.info("index %s: Milvus compacts its collection's segments itself; nothing to rewrite", root)
        return SearchIndex(root)
    with exclusive(root, "search index"):
        info = read_json(root / "index.json", "index description")
        _write_faiss(root, store, info.get("requested_kind", info["kind"]), info, max_memory=budget)
    return SearchIndex(root)


def _writer_view(root: Path, images_root: str | Path | None = None) -> tuple[dict[str, Any], EmbeddingStore, Path]:
    """What a writer needs of an index without loading its vectors (a writer loads the generation it changes
    itself, once): index.json, the store, where the collection root is."""
    if not (root / "index.json").is_file():
        raise ClipkdError(f"not a search index (no index.json): {root}; build one with `clipkd index build`")
    info = read_json(root / "index.json", "index description")
    missing = [k for k in ("identity", "embed_dim", "kind") if k not in info] if isinstance(info, dict) else ["all"]
    if missing or info.get("format") != INDEX_FORMAT:
        raise ClipkdError(f"index {root} is damaged: index.json lacks {missing or ['format']}; {REBUILD}")
    images = Path(images_root).resolve() if images_root is not None else (root / info.get("images", "/")).resolve()
    return info, EmbeddingStore(root / "store"), images
