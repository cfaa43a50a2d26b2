"""Retrieval metrics and ``clipkd eval-retrieval``.

Text↔image (as Chinese-CLIP reports it): Recall@1/5/10 in both directions and their mean. An image
may have several captions; text→image hits when its own image is in the top K, image→text when any
of the image's captions is. Image→image (the second seed's goal): every image queries all the
others; relevant = same label (class or product id). Recall@K = at least one relevant result in the
top K; P@10 = relevant fraction of the top 10; AP@K = Σ_k P@k·rel_k / min(K, number relevant),
averaged into mAP@K. All figures are fractions in [0, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.captions import CaptionSource, load_caption_source
from ..data.encode import encode_dataset
from ..data.folders import labels_from_paths  # noqa: F401 - its old home
from ..data.loader import ImageDataset, load_rgb
from ..data.sources import open_source
from ..errors import ClipkdError
from ..fileio import check_out_file, write_json
from ..teachers import resolve_model  # noqa: F401 - its old home; the model layer's now
from .metrics import KS, image_image_metrics, text_image_recall  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


@dataclass
class RetrievalResult:
    """One ``clipkd eval-retrieval``: ``metrics`` maps names such as ``t2i_r@1`` and ``i2i_map@10`` to values."""

    model: str
    images: str
    n_images: int
    skipped: int
    metrics: dict[str, float] = field(default_factory=dict)
    n_texts: int | None = None
    n_labels: int | None = None

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON: the counts and every metric at the top level."""
        d: dict[str, Any] = {"model": self.model, "images": self.images, "n_images": self.n_images,
                             "skipped": self.skipped}
        d.update({k: v for k, v in (("n_texts", self.n_texts), ("n_labels", self.n_labels)) if v is not None})
        return d | self.metrics

    def save(self, out: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        return write_json(out, self.to_dict())


def _image_image(result: RetrievalResult, emb: Any, paths: list[str], labelled: tuple, max_queries: int,
                 grid: str | Path | None, root: Path) -> None:
    """Image→image metrics of labelled images into ``result`` (at most ``max_queries`` queries), and the grid."""
    labels, names = labelled
    rng = np.random.default_rng(0)
    queries = np.sort(rng.choice(len(paths), max_queries, replace=False)) if len(paths) > max_queries else None
    result.n_labels = len(names)
    if max(np.bincount(labels)) < 2:
        log.warning("no label has two images; image→image metrics left out")
    else:
        result.metrics.update(image_image_metrics(emb, labels, queries=queries))
    if grid is not None and "i2i_map@10" in result.metrics:
        from .plots import plot_retrieval_grid

        plot_retrieval_grid(emb, paths, labels, lambda p: load_rgb(root / p), grid)


def evaluate_retrieval(
    model: str | Path,
    images: str | Path,
    captions: str | Path | None = None,
    batch_size: int = 128,
    workers: int | None = None,
    device: str = "auto",
    max_queries: int = 5000,
    grid: str | Path | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    text_model: str | Path | None = None,
) -> RetrievalResult:
    """Retrieval metrics of a model on ``images``: a CLIP (spec or clip-train run folder), or a distilled student
    (run folder, ``student.pt``, ``.onnx``) — with ``text_model`` (its teacher, or the teacher's exported text tower)
    for text queries, as a search index uses it.

    With ``captions`` (CSV or Chinese-CLIP JSONL): text↔image recall over the captioned images.
    Image→image metrics need labels: the first folder of each image path (ImageFolder classes or
    product ids). ``grid``: a PNG of a few queries and their top-10 results. ``out``: write the result
    JSON there, and the grid beside it (same name, ``.png``) unless ``grid`` names another file.
    """
    from ..models import load_image_model, with_text

    if out is not None:
        check_out_file(out, "results file")
    clip = with_text(load_image_model(model, device), text_model, device)
    if clip.kind == "classifier":
        raise ClipkdError(f"{model} is a classifier (the supervised baseline); retrieval needs embeddings")
    if captions is not None and not clip.has_text:  # a distilled student or an exported image tower
        raise ClipkdError(f"{model} is an image model without a text tower: text↔image recall needs a CLIP, or its "
                          "teacher's text tower (`text_model`); drop `captions` for image→image metrics")
    source = _retrieval_source(images, captions)
    dataset = ImageDataset(source.root, sorted(source.pairs), clip.preprocess, opener=source.opener)
    enc = encode_dataset(clip.encode_image, dataset, batch_size, workers, progress, desc="embed images")
    emb, skipped = enc.outputs, enc.skipped
    paths = [dataset.paths[i] for i in enc.index]
    if out is not None and grid is None:
        grid = Path(out).with_suffix(".png")
    result = RetrievalResult(clip.spec, str(images), len(paths), len(skipped))
    if captions is not None:
        texts = [(j, c) for j, p in enumerate(paths) for c in source.pairs[p]]  # each caption and its image
        result.n_texts = len(texts)
        result.metrics.update(text_image_recall(emb, clip.encode_text([c for _, c in texts]), [j for j, _ in texts]))
    labelled = _labels(source, paths)
    if labelled is not None:
        _image_image(result, emb, paths, labelled, max_queries, grid, dataset.root)
    if out is not None:
        result.save(out)
    return result


def _retrieval_source(images: str | Path, captions: str | Path | None) -> CaptionSource:
    """The images to evaluate: captioned pairs, or (image→image) the labels the source carries (a folder's: the
    first folder of each path); a Chinese-CLIP TSV without its texts is refused in one line."""
    if captions is not None:
        return load_caption_source(images, captions)
    src = open_source(images)
    if src.kind == "tsv":
        raise ClipkdError(f"{images} is a Chinese-CLIP TSV: its images carry no labels for image→image metrics; "
                          "give its texts with `captions` for text↔image recall")
    return CaptionSource(src.root, {k: [] for k in src.keys}, labels=src.label_of() if src.kind != "folder" else None)


def _labels(source: CaptionSource, paths: list[str]) -> tuple[np.ndarray, list[str]] | None:
    """Integer labels of ``paths`` and their names: the source's own labels (all of them labelled), else the first
    folder of each path; None where there are none (a TSV)."""
    if source.labels is None:
        return labels_from_paths(paths) if source.tsv is None else None
    if not all(p in source.labels for p in paths):
        return None
    names = sorted({source.labels[p] for p in paths})
    pos = {n: i for i, n in enumerate(names)}
    return np.array([pos[source.labels[p]] for p in paths]), names
