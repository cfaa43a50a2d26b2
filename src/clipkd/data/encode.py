"""The one loop that runs a model over a set of images: the store, retrieval, zero-shot scoring and the
search index all embed through it, so decoding, skipping and progress behave the same everywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..errors import ClipkdError
from .loader import ImageDataset, make_loader

log = logging.getLogger(__name__)


@dataclass
class EncodedBatch:
    """One batch's outputs (on CPU), the dataset indices and labels of its rows, and its undecodable items."""

    outputs: torch.Tensor | None
    index: list[int]
    labels: list[int]
    skipped: list[tuple[int, str]]


@dataclass
class Encoded:
    """Every decodable image's output row, with dataset indices and labels; ``skipped`` = ``(index, error)``."""

    outputs: torch.Tensor
    index: list[int]
    labels: list[int]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def iter_encoded(encode: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset, batch_size: int = 128,
                 workers: int | None = None, progress: bool = True, desc: str = "embed") -> Iterator[EncodedBatch]:
    """Yield ``encode(images)`` batch by batch (no gradients), counting undecodable files in the progress bar."""
    loader = make_loader(dataset, batch_size, workers=workers)
    skipped = 0
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            out = None
            if batch["image"] is not None:
                with torch.inference_mode():
                    out = encode(batch["image"]).float().cpu()
            skipped += len(batch["skipped"])
            bar.update(len(batch["index"]) + len(batch["skipped"]))
            if skipped:
                bar.set_postfix(skipped=skipped)
            yield EncodedBatch(out, batch["index"].tolist(), batch["label"].tolist(), batch["skipped"])


def encode_dataset(encode: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset, batch_size: int = 128,
                   workers: int | None = None, progress: bool = True, desc: str = "embed") -> Encoded:
    """All of :func:`iter_encoded` at once; skipped files are logged, and no decodable image is an error."""
    outs, index, labels, skipped = [], [], [], []
    for b in iter_encoded(encode, dataset, batch_size, workers, progress, desc):
        skipped += b.skipped
        if b.outputs is not None:
            outs.append(b.outputs)
            index += b.index
            labels += b.labels
    if not outs:
        raise ClipkdError(f"no image of {dataset.root} could be decoded ({len(skipped)} tried)")
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped, e.g. %s: %s", len(skipped),
                    len(dataset), dataset.paths[skipped[0][0]], skipped[0][1])
    return Encoded(torch.cat(outs), index, labels, skipped)
