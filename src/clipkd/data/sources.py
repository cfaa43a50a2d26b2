"""One image source: what a user names with ``--images`` → the root, the keys under it, their labels and how to open
them, for every input clipkd reads.

- a **folder** (any layout; the first folder of a path is its class when there is one),
- an **image list** (a CSV, or TSV, with a ``path`` column and, for labels, a ``label`` one; or one path a line),
- **WebDataset shards** (a ``.tar`` or a brace pattern; keys ``<shard>/<sample key>``; labels from ``.cls``/``.json``),
- a **Chinese-CLIP ``*_imgs.tsv``** (``id<TAB>base64`` rows, no header; keys are the image ids).

The store, ``distill``'s pool, the search index, ``eval-retrieval`` and ``export``'s sample images all open their
images here, so a new input format is one branch in this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClipkdError

__all__ = ["ImageSource", "is_cnclip_tsv", "open_source"]


@dataclass
class ImageSource:
    """Images named by ``keys`` under ``root``. ``labels``: one label per key where the source carries them (the
    first folder for a folder source, the label column for a list, the samples' labels for shards), else
    ``None``. ``opener(key)`` decodes keys that are not files (TSV rows), ``fingerprint(key)`` gives their content
    fingerprint; ``group(key)`` is what ranks split by (a tar sample's shard, so each rank reads its own shards)."""

    kind: str  # folder | list | shards | tsv
    root: Path
    keys: list[str]
    labels: list[str | None] | None = None
    opener: Callable[[str], Any] | None = None
    group: Callable[[str], str] | None = None
    fingerprint: Callable[[str], int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def label_of(self) -> dict[str, str]:
        """``key → label`` for the keys that have one."""
        if self.labels is None:
            return {}
        return {k: lab for k, lab in zip(self.keys, self.labels, strict=True) if lab is not None}


def is_cnclip_tsv(path: str | Path) -> bool:
    """A Chinese-CLIP ``*_imgs.tsv`` (``id<TAB>base64`` rows) rather than an image list with a ``path`` header."""
    p = Path(path)
    if p.suffix.lower() != ".tsv" or not p.is_file():
        return False
    with p.open("rb") as f:
        first = f.readline(4096)
    return first.split(b"\t")[0].strip().lower() != b"path"


def open_source(images: str | Path, what: str = "image folder") -> ImageSource:
    """The :class:`ImageSource` of ``images`` (see the module's docstring for the four kinds). A path that is none
    of them is a one-line error naming ``what``."""
    from .tars import is_tar_source, read_shards

    if is_tar_source(images):
        samples = read_shards(images)
        labels = samples.labels
        return ImageSource("shards", samples.root, list(samples.keys),
                           [None if labels.get(k) is None else str(labels[k]) for k in samples.keys] if labels
                           else None, group=samples.shard_of)
    p = Path(images)
    if is_cnclip_tsv(p):
        from .images import TsvImages

        tsv = TsvImages(p)
        return ImageSource("tsv", p.parent, list(tsv.offsets), None, opener=tsv.open, fingerprint=tsv.fingerprint)
    if p.is_file():
        from .datasets import read_path_list

        root, paths, labels = read_path_list(p)  # labels None: an unlabelled list (a pool)
        return ImageSource("list", root, paths, labels)
    if not p.is_dir():
        raise ClipkdError(f"{what} not found: {p} (give a folder, an image list, WebDataset shards or a Chinese-CLIP "
                          "TSV)")
    from .folders import clean_classname, list_images

    keys = list_images(p)
    labels = [clean_classname(k.split("/", 1)[0]) if "/" in k else None for k in keys]
    return ImageSource("folder", p, keys, labels if any(lab is not None for lab in labels) else None)
