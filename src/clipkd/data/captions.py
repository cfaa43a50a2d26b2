"""Image–caption pairs from a ``path,caption`` CSV (one row per caption; paths relative to the image root)."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipkdError
from .loader import ImageDataset


def read_captions(csv_path: str | Path, images_root: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """``{relative path: [captions]}`` for the rows whose image exists, and the missing paths.

    A file without ``path`` and ``caption`` columns, or whose images are all missing, is an error.
    """
    csv_path, images_root = Path(csv_path), Path(images_root)
    if not csv_path.is_file():
        raise ClipkdError(f"caption file not found: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ClipkdError(f"caption file {csv_path} needs a header with columns 'path' and 'caption', "
                              f"found {reader.fieldnames}")
        pairs: dict[str, list[str]] = {}
        for row in reader:
            if row["path"] and row["caption"]:
                pairs.setdefault(row["path"], []).append(row["caption"])
    missing = [p for p in pairs if not (images_root / p).is_file()]
    for p in missing:
        del pairs[p]
    if not pairs:
        raise ClipkdError(f"none of the images named in {csv_path} exist under {images_root} "
                          f"(first missing: {missing[:3]})")
    return pairs, missing


class CaptionDataset(ImageDataset):
    """Images with one randomly chosen caption per visit (``item["text"]``: its tokens).

    Distinct captions are tokenised once, up front, in batches; workers only index the result.
    """

    def __init__(self, root: str | Path, captions: dict[str, list[str]], transform: Callable,
                 tokenizer: Callable[[list[str]], Any], batch: int = 4096) -> None:
        super().__init__(root, sorted(captions), transform)
        unique = sorted({c for caps in captions.values() for c in caps})
        pos = {c: i for i, c in enumerate(unique)}
        self.tokens = torch.cat([tokenizer(unique[i : i + batch]) for i in range(0, len(unique), batch)])
        self.caption_ids = [[pos[c] for c in captions[p]] for p in self.paths]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["text"] = self.tokens[random.choice(self.caption_ids[index])]
        return item
