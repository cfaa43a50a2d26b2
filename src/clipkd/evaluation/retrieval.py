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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.captions import CaptionSource, load_caption_source
from ..data.encode import encode_dataset
from ..data.loader import ImageDataset, load_rgb
from ..data.sources import open_source
from ..errors import ClipkdError
from ..fileio import write_json
from ..teachers import resolve_model  # noqa: F401 - its old home; the model layer's now

KS = (1, 5, 10)
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


def _topk(sim: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices of the ``k`` largest entries per row (ties: lower index first), in row chunks."""
    k = min(k, sim.shape[1])
    return torch.cat([sim[i : i + chunk].topk(k, dim=1, sorted=True).indices for i in range(0, len(sim), chunk)])


def text_image_recall(img: torch.Tensor, txt: torch.Tensor, txt_to_img: Sequence[int],
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """``t2i_r@K``, ``i2t_r@K`` and ``mean_recall`` for L2-normalised image and text embeddings."""
    owner = torch.as_tensor(np.asarray(txt_to_img), dtype=torch.long)
    sim = txt.float() @ img.float().T  # texts × images
    top = _topk(sim, max(ks))
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_r@{k}"] = float((top[:, :k] == owner[:, None]).any(1).float().mean())
    top_t = _topk(sim.T, max(ks))  # images × texts
    hit_owner = owner[top_t]  # the image each retrieved text belongs to
    for k in ks:
        mine = hit_owner[:, :k] == torch.arange(len(img))[:, None]
        out[f"i2t_r@{k}"] = float(mine.any(1).float().mean())
    out["mean_recall"] = float(np.mean([out[f"{d}_r@{k}"] for d in ("t2i", "i2t") for k in ks]))
    return out


def image_image_metrics(emb: torch.Tensor, labels: Sequence[int], ks: Sequence[int] = KS, map_k: int = 10,
                        queries: Sequence[int] | None = None) -> dict[str, float]:
    """Leave-one-out image→image retrieval over ``emb`` (each query excluded from its own results).

    Returns ``i2i_r@K``, ``i2i_map@{map_k}`` and ``i2i_p@10``. Queries without any other image
    of their label are left out of the averages (their count is ``i2i_queries_without_match``).
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    q = torch.arange(len(emb)) if queries is None else torch.as_tensor(np.asarray(queries), dtype=torch.long)
    n_rel = torch.bincount(labels_t)[labels_t[q]] - 1
    keep = n_rel > 0
    q, n_rel = q[keep], n_rel[keep]
    if len(q) == 0:
        raise ClipkdError("image→image retrieval needs at least two images of some label")
    depth = max(max(ks), map_k, 10)
    rel_rows = []
    for i in range(0, len(q), 1024):
        qi = q[i : i + 1024]
        sim = emb[qi].float() @ emb.float().T
        sim[torch.arange(len(qi)), qi] = float("-inf")
        top = sim.topk(min(depth, len(emb) - 1), dim=1).indices
        rel_rows.append(labels_t[top] == labels_t[qi][:, None])
    rel = torch.cat(rel_rows).float()
    out = {f"i2i_r@{k}": float(rel[:, :k].amax(1).mean()) for k in ks}
    rk = rel[:, :map_k]
    precision_at = rk.cumsum(1) / torch.arange(1, rk.shape[1] + 1)
    ap = (precision_at * rk).sum(1) / torch.clamp(n_rel, max=map_k).float()
    out[f"i2i_map@{map_k}"] = float(ap.mean())
    out["i2i_p@10"] = float(rel[:, :10].sum(1).div(10).mean())
    out["i2i_queries"] = int(len(q))
    out["i2i_queries_without_match"] = int((~keep).sum())
    return out


def labels_from_paths(paths: Sequence[str]) -> tuple[list[int], list[str]] | None:
    """Labels from the first folder of each relative path (class or product-id folders), if every path has one."""
    first = [Path(p).parts[0] if len(Path(p).parts) > 1 else None for p in paths]
    if any(f is None for f in first):
        return None
    names = sorted(set(first))
    pos = {n: i for i, n in enumerate(names)}
    return [pos[f] for f in first], names


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

    clip = with_text(load_image_model(model, device), text_model, device)
    if clip.kind == "classifier":
        raise ClipkdError(f"{model} is a classifier (the supervised baseline); retrieval needs embeddings")
    if captions is not None and not clip.has_text:  # a distilled student or an exported image tower
        raise ClipkdError(f"{model} is an image model without a text tower: text↔image recall needs a CLIP, or its "
                          "teacher's text tower (--text-model); drop --captions for image→image metrics")
    spec = clip.spec
    if captions is not None:
        source = load_caption_source(images, captions)
    else:  # image→image over the labels the source carries (a folder's: the first folder of each path)
        src = open_source(images)
        if src.kind == "tsv":
            raise ClipkdError(f"{images} is a Chinese-CLIP TSV: its images carry no labels for image→image metrics; "
                              "give its texts with --captions for text↔image recall")
        source = CaptionSource(src.root, {k: [] for k in src.keys},
                               labels=src.label_of() if src.kind != "folder" else None)
    dataset = ImageDataset(source.root, sorted(source.pairs), clip.preprocess, opener=source.opener)
    enc = encode_dataset(clip.encode_image, dataset, batch_size, workers, progress, desc="embed images")
    emb, skipped = enc.outputs, enc.skipped
    paths = [dataset.paths[i] for i in enc.index]
    if out is not None and grid is None:
        grid = Path(out).with_suffix(".png")
    result = RetrievalResult(spec, str(images), len(paths), len(skipped))
    if captions is not None:
        texts, owner = [], []
        for j, p in enumerate(paths):
            for c in source.pairs[p]:
                texts.append(c)
                owner.append(j)
        txt = clip.encode_text(texts)
        result.n_texts = len(texts)
        result.metrics.update(text_image_recall(emb, txt, owner))
    if source.labels is not None:  # labels the samples carry
        names = sorted({source.labels[p] for p in paths if p in source.labels})
        pos = {n: i for i, n in enumerate(names)}
        labelled = (np.array([pos.get(source.labels.get(p), -1) for p in paths]), names) \
            if all(p in source.labels for p in paths) else None
    else:
        labelled = labels_from_paths(paths) if source.tsv is None else None
    if labelled is not None:
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

            plot_retrieval_grid(emb, paths, labels, lambda p: load_rgb(dataset.root / p), grid)
    if out is not None:
        result.save(out)
    return result
