"""Retrieval metrics and ``clipkd eval-retrieval``.

Text↔image (as Chinese-CLIP reports it): Recall@1/5/10 in both directions and their mean. An image
may have several captions; text→image hits when its own image is in the top K, image→text when any
of the image's captions is. Image→image (the second seed's goal): every image queries all the
others; relevant = same label (class or product id). Recall@K = at least one relevant result in the
top K; P@10 = relevant fraction of the top 10; AP@K = Σ_k P@k·rel_k / min(K, number relevant),
averaged into mAP@K. All figures are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..data.captions import CaptionSource, load_caption_source
from ..data.folders import list_images
from ..data.loader import ImageDataset, load_rgb, make_loader
from ..errors import ClipkdError
from ..fileio import read_json

KS = (1, 5, 10)


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


@torch.no_grad()
def encode_images(model: Any, dataset: ImageDataset, batch_size: int = 128, workers: int | None = None,
                  progress: bool = True) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Normalised embeddings of every decodable image, their dataset indices, and the skipped ``(index, error)``."""
    loader = make_loader(dataset, batch_size, workers=workers)
    embs, kept, skipped = [], [], []
    for batch in tqdm(loader, desc="embed images", unit="batch", disable=not progress):
        skipped += batch["skipped"]
        if batch["image"] is not None:
            embs.append(model.encode_image(batch["image"]).cpu())
            kept += batch["index"].tolist()
    if not embs:
        raise ClipkdError(f"no image of {dataset.root} could be decoded")
    return torch.cat(embs), kept, skipped


def resolve_model(model: str | Path) -> str:
    """A model spec, or a ``clip-train`` run folder (its ``run.json`` names the spec of the trained model)."""
    p = Path(model)
    if p.is_dir():
        if not (p / "run.json").is_file():
            raise ClipkdError(f"{p} is not a clip-train run folder (no run.json)")
        spec = read_json(p / "run.json", "clip-train run").get("spec") or read_json(p / "run.json").get(
            "teacher_spec")
        if not spec:
            raise ClipkdError(f"{p / 'run.json'} names no model spec")
        return spec
    return str(model)


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
) -> dict[str, Any]:
    """Retrieval metrics of a CLIP model (spec or clip-train run folder) on ``images``.

    With ``captions`` (CSV or Chinese-CLIP JSONL): text↔image recall over the captioned images.
    Image→image metrics need labels: the first folder of each image path (ImageFolder classes or
    product ids). ``grid``: a PNG of a few queries and their top-10 results.
    """
    from ..teachers import load_teacher

    spec = resolve_model(model)
    clip = load_teacher(spec, device=device)
    if captions is not None:
        source = load_caption_source(images, captions)
    else:
        root = Path(images)
        if not root.is_dir():
            raise ClipkdError(f"image folder not found: {root}")
        source = CaptionSource(root, {p: [] for p in list_images(root)})
    dataset = ImageDataset(source.root, sorted(source.pairs), clip.preprocess, opener=source.opener)
    emb, kept, skipped = encode_images(clip, dataset, batch_size, workers, progress)
    paths = [dataset.paths[i] for i in kept]
    result: dict[str, Any] = {"model": spec, "images": str(images), "n_images": len(paths), "skipped": len(skipped)}
    if captions is not None:
        texts, owner = [], []
        for j, p in enumerate(paths):
            for c in source.pairs[p]:
                texts.append(c)
                owner.append(j)
        txt = clip.encode_text(texts)
        result["n_texts"] = len(texts)
        result.update(text_image_recall(emb, txt, owner))
    labelled = labels_from_paths(paths) if source.tsv is None else None
    if labelled is not None:
        labels, names = labelled
        rng = np.random.default_rng(0)
        queries = np.sort(rng.choice(len(paths), max_queries, replace=False)) if len(paths) > max_queries else None
        result["n_labels"] = len(names)
        if max(np.bincount(labels)) < 2:
            print("note: no label has two images; image→image metrics left out")
        else:
            result.update(image_image_metrics(emb, labels, queries=queries))
        if grid is not None and "i2i_map@10" in result:
            from .plots import plot_retrieval_grid

            plot_retrieval_grid(emb, paths, labels, lambda p: load_rgb(dataset.root / p), grid)
    return result
