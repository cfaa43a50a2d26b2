"""The one data-loader factory: images decoded in workers, corrupt files skipped and reported."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .images import load_rgb, to_rgb

__all__ = ["ImageDataset", "PackedStrings", "load_rgb", "make_loader", "to_rgb"]


class PackedStrings(Sequence[str]):
    """A read-only list of strings kept as two numpy arrays (UTF-8 bytes and offsets), not as Python objects.

    DataLoader workers are forked from the process that holds a data set's paths; reading a Python ``str`` changes
    its reference count, which copies the memory page it sits on into the worker, so a list of a million paths ends up
    copied once per worker. Numpy buffers are only read, and stay shared.
    """

    def __init__(self, items: Iterable[str]) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):  # int -> str; slice -> list[str]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} strings")
        return self._bytes[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


class ImageDataset(Dataset):
    """Images under ``root`` by relative path; item = ``{"index", "image", "label", "error"}``.

    ``transform`` maps a PIL image to a tensor or a tuple of tensors (several views of the same
    image, e.g. the student's and the teacher's preprocessing). A file that cannot be decoded
    yields ``image=None`` and its error text instead of raising, so one bad file among millions
    is skipped and counted rather than ending the job. ``opener`` replaces file reading for images
    that are not files (e.g. base64 rows of a Chinese-CLIP TSV, keyed by id in ``paths``). ``targets``: rows
    indexed like ``paths`` (e.g. a store's :class:`~clipkd.store.TargetRows`, read on demand); each item then
    carries its row as ``"target"``, so a trainer never holds every target in memory or on its device.
    """

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[str],
        transform: Callable[[Image.Image], Any],
        labels: Sequence[int] | None = None,
        draft_size: int | None = None,
        opener: Callable[[str], Image.Image] | None = None,
        targets: Any = None,
    ) -> None:
        self.root = Path(root)
        self.targets = targets
        self.opener = opener
        self.paths = paths if isinstance(paths, PackedStrings) else PackedStrings(paths)  # shared by forked workers
        self.transform = transform
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.labels[index]) if self.labels is not None else -1
        try:
            if self.opener is not None:
                img = self.opener(self.paths[index])
            else:
                img = load_rgb(self.root / self.paths[index], self.draft_size)
            image = self.transform(img)
            error = ""
        except Exception as e:  # noqa: BLE001 - any decode failure is a skip, reported by name
            image, error = None, f"{type(e).__name__}: {e}"
        item = {"index": index, "image": image, "label": label, "error": error}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def collate_skip(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable items; list the others under ``"skipped"`` as ``(index, error)``."""
    good = [it for it in items if it["image"] is not None]
    skipped = [(it["index"], it["error"]) for it in items if it["image"] is None]
    batch: dict[str, Any] = {"skipped": skipped}
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    batch["label"] = torch.tensor([it["label"] for it in good], dtype=torch.long)
    for key in items[0]:
        if key not in ("index", "image", "label", "error"):
            batch[key] = torch.stack([it[key] for it in good]) if good else None
    if not good:
        batch["image"] = None
    elif isinstance(good[0]["image"], tuple):
        batch["image"] = tuple(torch.stack(v) for v in zip(*(it["image"] for it in good), strict=True))
    else:
        batch["image"] = torch.stack([it["image"] for it in good])
    return batch


def default_workers() -> int:
    """Loader worker processes: one per available core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int | None = None,
    drop_last: bool = False,
    seed: int = 0,
    sampler: Any = None,
) -> DataLoader:
    """Build the DataLoader every command uses (skip-aware collate, pinned memory on GPU)."""
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
    )
