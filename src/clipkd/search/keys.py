"""Row keys of an index: where its images come from (folders, lists, shards, Chinese-CLIP TSVs) and how a key
names a file or a TSV row."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClipkdError
from ..fileio import relative


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


