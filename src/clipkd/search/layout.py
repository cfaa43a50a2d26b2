"""An index folder on disk: ``index.json``, the model references it records (relative, so the folder moves), the
generations under ``gen/`` written whole and then named, and the label and column files that filters read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipkdError, first_line
from ..fileio import atomic_write, read_json, relative, write_json, write_npy, write_text
from .planning import _faiss

INDEX_FORMAT = "clipkd-index/1"
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
INFO = "index.json"  # the index's description, written atomically and last by every change
REQUIRED = ("identity", "model", "embed_dim", "kind")


def read_info(root: str | Path, missing_ok: bool = False, check: bool = True) -> dict[str, Any] | None:
    """``index.json`` of the index at ``root``: the one reading every reader and writer goes through. A folder
    without one is a one-line error (None with ``missing_ok``); with ``check``, a description of another format,
    one lacking what a search needs (:data:`REQUIRED`, and ``milvus`` for a Milvus index), or naming an unknown
    FAISS kind is a one-line "damaged" error."""
    from .planning import KINDS

    root = Path(root)
    if not (root / INFO).is_file():
        if missing_ok:
            return None
        raise ClipkdError(f"not a search index (no index.json): {root}; build one with `clipkd index build`")
    info = read_json(root / INFO, "index description")
    if not check:
        return info
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise ClipkdError(f"{root / INFO} is not a {INDEX_FORMAT} description")
    missing = [k for k in REQUIRED + (("milvus",) if info.get("backend") == "milvus" else ()) if k not in info]
    if missing:
        raise ClipkdError(f"index {root} is damaged: index.json lacks {missing}; {REBUILD}")
    if info.get("backend") != "milvus" and (info["kind"] not in KINDS or info["kind"] == "auto"):
        raise ClipkdError(f"index {root} is damaged: index.json names kind {info['kind']!r}; {REBUILD}")
    return info


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
    info = read_info(root, missing_ok=True, check=False)
    return None if info is None else read_generation(root, info)


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
    on_disk = read_info(root, missing_ok=True, check=False) or {}
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
    write_json(root / INFO, info)
    for old in (root / GENERATIONS).iterdir():  # a server still reading generation N-1 keeps it
        if old.name.isdigit() and int(old.name) < number - 1:
            shutil.rmtree(old, ignore_errors=True)
    for legacy in ("faiss.npy", "rows.npy", "removed.txt"):  # the layout before generations
        (root / legacy).unlink(missing_ok=True)
    return info



def _read_labels(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        p, _, label = line.partition("\t")
        out[p] = label
    return out


def _removed_now(root: Path) -> set[str]:
    """The keys removed from the index at ``root`` as it is on disk (without loading its FAISS file, which a rebuild
    may be replacing because it is damaged)."""
    info = read_info(root, missing_ok=True, check=False)
    if info is None:
        return set()
    number = info.get("generation")
    return _read_lines(root / GENERATIONS / str(int(number)) / "removed.txt" if number is not None
                       else root / "removed.txt")


def _tombstones(rows: np.ndarray, paths: Sequence[str], removed: set[str]) -> np.ndarray:
    """The FAISS positions whose store rows are removed keys."""
    if not removed:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.fromiter((paths[r] in removed for r in rows.tolist()), bool, len(rows)))


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


