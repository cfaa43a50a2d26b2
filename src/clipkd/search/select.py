"""``clipkd select``: a CLIP-filtered training set from the user's own pool of unlabelled images (the first
seed's step 1, which used a public search service): the top images per class prompt, each image at most once."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipkdError
from ..fileio import write_text
from ..prompts import embed_prompts, read_prompts
from .index import SearchIndex

log = logging.getLogger(__name__)
# Cosine at or above which a pool image is a near-copy of one already chosen for its class. The lower 0.98 dropped
# 89-95 % of the distinct images of a class on clipkd's teachers, whose embeddings of one class lie that close;
# 0.999 drops 0.0-0.2 % of them and catches identical copies and 24-98 % of re-encoded or resized ones
# (benchmarks/results/defaults.md): a near-copy kept costs a little compute, a distinct image dropped costs data.
DUPLICATE_COSINE = 0.999


@dataclass
class Selection:
    """The chosen images by class, and the classes that got fewer than asked."""

    chosen: dict[str, list[tuple[str, float]]]
    short: dict[str, int]
    out: Path


def select_images(index_dir: str | Path | SearchIndex, prompts: str | Path | dict[str, list[str]], out: str | Path,
                  per_class: int = 100, min_similarity: float = -1.0, duplicate: float = DUPLICATE_COSINE,
                  text_model: str | Path | None = None, device: str | None = "auto",
                  precision: str = "auto") -> Selection:
    """Pick up to ``per_class`` images per class from an indexed pool and write a ``path,label`` image list.

    Class text embeddings are the template-averaged prompts (``prompts.json`` from ``clipkd prompts``). An image
    goes to at most one class (the one it matches best among those that want it), needs a similarity of at least
    ``min_similarity`` (default: none; what a good match scores is model-specific), and is dropped as a
    near-duplicate when its embedding has cosine ≥ ``duplicate`` with an image already chosen for the class.
    ``text_model``: a distilled student index's teacher. ``index_dir`` may be an opened index whose encoder is
    loaded already (what :func:`~clipkd.search.index.build_index` returns): the model is not loaded a second time.
    """
    if per_class < 1:
        raise ClipkdError(f"`per_class` must be ≥ 1, got {per_class}")
    index = index_dir if isinstance(index_dir, SearchIndex) else SearchIndex(index_dir)
    prompts = prompts if isinstance(prompts, dict) else read_prompts(prompts)
    if not prompts:
        raise ClipkdError("no class prompts given")
    enc = index.encoder if index.encoder is not None and text_model is None else index.load_encoder(
        text_model=text_model, device=device, precision=precision)
    if not enc.has_text:
        raise ClipkdError(f"{index.identity} has no text tower; select needs one (`text_model` for a student index)")
    text = embed_prompts(enc, prompts)
    emb = index.store.embeddings()
    k = min(len(index), per_class * 4 + 16)
    while True:  # search deeper while a class is short and the pool has more to offer
        chosen = _assign(index, text.embeddings, text.classnames, emb, k, per_class, min_similarity, duplicate)
        if k >= len(index) or all(len(v) >= per_class for v in chosen.values()):
            break
        k = min(len(index), k * 4)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "similarity"])
    for name, items in chosen.items():
        for path, s in items:
            w.writerow([path, name, f"{s:.4f}"])
    out = write_text(out, buf.getvalue())
    short = {c: len(v) for c, v in chosen.items() if len(v) < per_class}
    if short:
        log.warning("%d class(es) got fewer than %d images (raise the pool or lower `min_similarity`), e.g. %s",
                    len(short), per_class, dict(list(short.items())[:3]))
    return Selection(chosen, short, Path(out))


def _assign(index: SearchIndex, text: np.ndarray, classnames: list[str], emb: np.ndarray, k: int, per_class: int,
            min_similarity: float, duplicate: float) -> dict[str, list[tuple[str, float]]]:
    """Greedy by similarity over every class's top ``k``: each image to one class, near-copies skipped."""
    scores, rows = index.search_vectors(text, k)
    cands = sorted(((float(s), c, int(r)) for c, (srow, rrow) in enumerate(zip(scores, rows, strict=True))
                    for s, r in zip(srow, rrow, strict=True) if r >= 0 and s >= min_similarity), reverse=True)
    taken: set[int] = set()
    chosen: dict[str, list[tuple[str, float]]] = {c: [] for c in classnames}
    vecs: dict[str, list[np.ndarray]] = {c: [] for c in classnames}
    for s, c, r in cands:
        name = classnames[c]
        if r in taken or len(chosen[name]) >= per_class:
            continue
        v = np.asarray(emb[r], dtype=np.float32)
        taken.add(r)
        if vecs[name] and float(np.max(np.stack(vecs[name]) @ v)) >= duplicate:
            continue  # a near-copy of an image already chosen: not a new example of anything
        chosen[name].append((str(index.images_root / index.paths[r]), s))
        vecs[name].append(v)
    return chosen
