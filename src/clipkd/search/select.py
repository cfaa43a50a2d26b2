"""``clipkd select``: a CLIP-filtered training set from the user's own pool of unlabelled images (the first
seed's step 1, which used a public search service).

An uncurated pool is mostly none of the classes. Each image is scored against every class prompt and a bank of
background prompts (:data:`BACKGROUND`: noise, blank images, textures, other things); it is a candidate for its best
class only if that class beats every background prompt, and it is kept only if its *margin* (best class minus
second best) clears the class's cut. The cut is chosen from the margins themselves: Otsu's two-group split of the
class's candidates where they are clearly two groups (between-group share of the variance ≥ :data:`BIMODAL`), else
the same split over the whole pool's candidates. Classes with labelled *examples* (in generalized zero-shot learning,
the seen classes' training images, embedded by the same teacher: ``examples`` and its store) also ask an image to lie
as close to the mean of their examples as all but :data:`EXAMPLE_QUANTILE` (5 %) of the examples do: the text prompts
alone cannot tell a class's images from pool images the teacher embeds near them, and a class whose quota outruns its
images in the pool is otherwise filled with them. A quota per class (``per_class``) caps each class; a class below
``min_per_class`` is listed with how many it got. On clipkd's digit worlds (``make bench-gzsl``'s uncurated pools,
2× and 10× as many distractors as real images; ``benchmarks/results/gzsl-pool*.md``) the selection's precision is
1.00 on the unseen classes at both; on the seen classes 0.84-0.99 from the prompts alone and 1.00 with examples; the
top-k-per-prompt rule it replaced padded every class to its quota with distractors (0.62 / 0.64 on the unseen
classes at 2×)."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClipkdError
from ..fileio import write_text
from ..prompts import embed_prompts, read_prompts
from .index import SearchIndex

if TYPE_CHECKING:
    from ..store import EmbeddingStore

log = logging.getLogger(__name__)
# Cosine at or above which a pool image is a near-copy of one already chosen for its class. The lower 0.98 dropped
# 89-95 % of the distinct images of a class on clipkd's teachers, whose embeddings of one class lie that close;
# 0.999 drops 0.0-0.2 % of them and catches identical copies and 24-98 % of re-encoded or resized ones
# (benchmarks/results/defaults.md): a near-copy kept costs a little compute, a distinct image dropped costs data.
DUPLICATE_COSINE = 0.999
# Generic negatives: what an uncurated pool holds besides the classes (each embedded with the class templates)
BACKGROUND = ("noise", "random noise", "static", "a blank image", "a texture", "a pattern", "an abstract shape",
              "a blob", "a scribble", "something else")
# A pool image lies as close to its class's examples (their mean embedding) as all but this share of them. The
# loosest cut that kept the seen classes' precision above 0.9 on every world of make bench-gzsl (the demo world's
# lookalikes: 0.86 at 0, 0.88 at 0.01, 0.94 at 0.05; the digit worlds 1.00 at any; benchmarks/results/
# gzsl-pool-quantiles.md); each step up costs recall
EXAMPLE_QUANTILE = 0.05
BIMODAL = 0.85  # a class's margins are two groups (its own cut) when Otsu's split explains this share of the variance


@dataclass
class Selection:
    """The chosen images by class (best first), the classes below the floor (how many they got), the best images
    each class turned down (for the contact sheet), and how many pool images each rule rejected."""

    chosen: dict[str, list[tuple[str, float]]]
    short: dict[str, int]
    out: Path
    rejected: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    cuts: dict[str, float] = field(default_factory=dict)


def otsu(x: np.ndarray) -> tuple[float, float]:
    """Otsu's two-group split of 1-D scores: (threshold, share of the variance between the groups)."""
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    if n < 2 or x[0] == x[-1]:
        return -np.inf, 0.0
    c = np.cumsum(x)
    i = np.arange(1, n)
    w0 = i / n
    between = w0 * (1 - w0) * (c[:-1] / i - (c[-1] - c[:-1]) / (n - i)) ** 2
    j = int(np.argmax(between))
    return float((x[j] + x[j + 1]) / 2), float(between[j] / x.var())


def select_images(index_dir: str | Path | SearchIndex, prompts: str | Path | dict[str, list[str]], out: str | Path,
                  per_class: int = 100, min_per_class: int = 1, min_similarity: float = -1.0,
                  duplicate: float = DUPLICATE_COSINE, background: Sequence[str] | str | Path | None = BACKGROUND,
                  margin: float | None = None, examples: str | Path | ExamplePrototypes | None = None,
                  examples_store: str | Path | None = None, split: str | Path | None = None,
                  example_quantile: float = EXAMPLE_QUANTILE, text_model: str | Path | None = None,
                  device: str | None = "auto", precision: str = "auto") -> Selection:
    """Pick up to ``per_class`` images per class from an indexed pool and write a ``path,label,similarity`` list.

    Class text embeddings are the template-averaged prompts (``prompts.json`` from ``clipkd prompts``); the
    ``background`` phrases (a list, or a file of one phrase per line; ``None``, empty or ``"none"``: no background
    rejection) are embedded with the first class's templates. An image goes to at most one class (its best), must
    beat every background prompt, reach ``min_similarity`` and clear its class's margin cut (``margin``; ``None``:
    chosen from the margins, module docstring); near-copies (cosine ≥ ``duplicate`` with
    an image already chosen for the class) are dropped. ``examples``: labelled images of some of the classes (a
    folder, list or shards; with ``split``, its seen classes only) whose teacher embeddings ``examples_store`` holds
    (``embed-images``' store, from the index's teacher): a class with examples keeps only images as close to their
    mean as all but ``example_quantile`` of them (``examples`` may be :func:`example_prototypes` already read,
    as ``source`` does before it embeds the pool). ``text_model``: a distilled student index's teacher.
    ``index_dir`` may be an opened index whose encoder is loaded already (the model is not loaded twice).
    """
    read = examples if isinstance(examples, ExamplePrototypes) else None
    background = check_selection(per_class, min_per_class, margin, background, None if read else examples,
                                 examples_store, example_quantile)
    index = index_dir if isinstance(index_dir, SearchIndex) else SearchIndex(index_dir)
    prompts = prompts if isinstance(prompts, dict) else read_prompts(prompts)
    if not prompts:
        raise ClipkdError("no class prompts given")
    if read is not None:
        read.check_teacher(index.store.teacher)
    protos = read or (None if examples is None else example_prototypes(examples, examples_store, list(prompts),
                                                                       index.store.teacher, split, example_quantile))
    enc = index.encoder if index.encoder is not None and text_model is None else index.load_encoder(
        text_model=text_model, device=device, precision=precision)
    if not enc.has_text:
        raise ClipkdError(f"{index.identity} has no text tower; select needs one (`text_model` for a student index)")
    text = embed_prompts(enc, prompts)
    bank = _background(enc, prompts, background)
    chosen, rejected, reasons, cuts = _assign(index, text.embeddings, text.classnames, bank, per_class,
                                              min_similarity, duplicate, margin, protos and protos.by_class)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "similarity"])
    here = Path(out).resolve().parent  # paths relative to the list's folder: list and pool move together
    for name, items in chosen.items():
        for path, sim in items:
            w.writerow([Path(os.path.relpath(Path(path).resolve(), here)).as_posix(), name, f"{sim:.4f}"])
    out = write_text(out, buf.getvalue())
    short = {c: len(v) for c, v in chosen.items() if len(v) < min_per_class}
    if short:
        log.warning("%d class(es) got fewer than %d images (the pool has too few of them that the teacher tells "
                    "apart), e.g. %s", len(short), min_per_class, dict(list(short.items())[:3]))
    return Selection(chosen, short, Path(out), rejected, reasons, cuts)


def check_selection(per_class: int, min_per_class: int, margin: float | None,
                    background: Sequence[str] | str | Path | None, examples: str | Path | None = None,
                    examples_store: str | Path | None = None, example_quantile: float = EXAMPLE_QUANTILE) -> list[str]:
    """The selection's settings checked (one line each) before any work; returns the background phrases."""
    if not 0 <= example_quantile < 1:
        raise ClipkdError(f"`example_quantile` must be in [0, 1), got {example_quantile}")
    if (examples is None) != (examples_store is None):
        raise ClipkdError("`examples` and `examples_store` go together: the labelled images and the store of their "
                          "teacher embeddings (embed-images)")
    if examples_store is not None and not (Path(examples_store) / "manifest.json").is_file():
        raise ClipkdError(f"examples store not found: {examples_store} (embed-images writes one)")
    if per_class < 1:
        raise ClipkdError(f"`per_class` must be ≥ 1, got {per_class}")
    if min_per_class < 0:
        raise ClipkdError(f"`min_per_class` must be ≥ 0, got {min_per_class}")
    if margin is not None and not 0 <= margin <= 2:
        raise ClipkdError(f"`margin` must be between 0 and 2 (a difference of cosines), got {margin}")
    return _phrases(background)


def _phrases(background: Sequence[str] | str | Path | None) -> list[str]:
    """Background phrases from a list or a file of one per line (``"none"``: none)."""
    if background is None or (isinstance(background, str) and background.strip().lower() in ("", "none")):
        return []
    if isinstance(background, (str, Path)):
        path = Path(background)
        if not path.is_file():
            raise ClipkdError(f"background phrases not found: {path} (a file of one phrase per line, or 'none')")
        phrases = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not phrases:
            raise ClipkdError(f"{path} holds no background phrase (give 'none' for no background rejection)")
        return phrases
    return [str(b) for b in background]


def _background(enc: Any, prompts: dict[str, list[str]], background: Sequence[str] | None) -> np.ndarray | None:
    """The background phrases embedded with the first class's templates (its prompts with the name swapped)."""
    if not background:
        return None
    name, lines = next(iter(prompts.items()))
    templates = [p.replace(name, "{}") for p in lines if name in p] or ["{}"]
    return embed_prompts(enc, {b: [t.format(b) for t in templates] for b in background}).embeddings


Picks = dict[str, list[tuple[str, float]]]


@dataclass
class ExamplePrototypes:
    """Per class with labelled examples: the mean of their teacher embeddings (unit length) and the cut, the
    quantile of the examples' own cosines to it; ``store``: the store they came from (its teacher is checked
    against the pool index's)."""

    by_class: dict[str, tuple[np.ndarray, float]]
    store: EmbeddingStore

    def check_teacher(self, identity: str) -> None:
        self.store.check_teacher(identity, "the examples' store must come from the pool index's teacher")


def example_prototypes(examples: str | Path, store: str | Path, classnames: Sequence[str], teacher: str | None,
                       split: str | Path | None = None, quantile: float = EXAMPLE_QUANTILE) -> ExamplePrototypes:
    """The examples' :class:`ExamplePrototypes`, checked against the prompts' ``classnames`` and (unless ``None``)
    the ``teacher`` identity of the pool's index."""
    from ..data.datasets import seen_images
    from ..store import EmbeddingStore

    data, _ = seen_images(examples, split)
    unknown = sorted(set(data.classnames[y] for y in set(data.labels)) - set(classnames))
    if unknown:
        raise ClipkdError(f"{len(unknown)} class(es) of the examples have no prompt (e.g. {unknown[:3]}); "
                          "give prompts for them or leave them out of the examples")
    st = EmbeddingStore(store)
    tg = st.targets(data.paths, what="examples", root=data.root)
    emb = tg.targets.numpy().astype(np.float32)
    labels = np.asarray(data.labels)[tg.keep]
    out: dict[str, tuple[np.ndarray, float]] = {}
    for y in np.unique(labels):
        v = emb[labels == y]
        v /= np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
        p = v.mean(0)
        p /= max(float(np.linalg.norm(p)), 1e-12)
        out[data.classnames[int(y)]] = (p, float(np.quantile(v @ p, quantile)))
    protos = ExamplePrototypes(out, st)
    if teacher is not None:
        protos.check_teacher(teacher)
    return protos


def _assign(index: SearchIndex, text: np.ndarray, classnames: list[str], bank: np.ndarray | None, per_class: int,
            min_similarity: float, duplicate: float,
            margin: float | None = None, protos: dict[str, tuple[np.ndarray, float]] | None = None,
            ) -> tuple[Picks, Picks, dict[str, int], dict[str, float]]:
    """Each pool image to its best class, kept when it beats the background, clears the class's margin cut and
    (for a class with examples) lies as close to their mean as most of them."""
    emb = index.store.embeddings()
    n = len(emb)
    best = np.empty(n, np.int64)
    s1 = np.empty(n, np.float32)
    gap = np.empty(n, np.float32)  # best class minus second best
    bg = np.full(n, -np.inf, np.float32)
    for start in range(0, n, 65_536):  # scores a chunk at a time: memory flat in the pool
        v = np.asarray(emb[start:start + 65_536], np.float32)
        sims = v @ text.T
        top2 = np.sort(sims, axis=1)[:, -2:] if sims.shape[1] > 1 else np.concatenate([sims, sims - 1], 1)
        best[start:start + len(v)] = sims.argmax(1)
        s1[start:start + len(v)] = top2[:, -1]
        gap[start:start + len(v)] = top2[:, -1] - top2[:, 0]
        if bank is not None:
            bg[start:start + len(v)] = (v @ bank.T).max(1)
    alive = np.asarray(index.live[:n], bool)  # removed rows are not candidates
    cand = alive & (s1 > bg) & (s1 >= min_similarity)
    reasons = {"background": int(np.sum(alive & (s1 <= bg))), "min_similarity": int(np.sum(alive & (s1 > bg) &
                                                                                           (s1 < min_similarity)))}
    pool_cut, _ = otsu(gap[cand])
    chosen: dict[str, list[tuple[str, float]]] = {}
    rejected: dict[str, list[tuple[str, float]]] = {}
    cuts: dict[str, float] = {}
    below = unlike = dup = over = 0
    for c, name in enumerate(classnames):
        idx = np.flatnonzero(cand & (best == c))
        cut, split = otsu(gap[idx])
        cuts[name] = margin if margin is not None else cut if split >= BIMODAL else pool_cut
        ok = cand & (best == c) & (gap >= cuts[name])
        keep = np.flatnonzero(ok)
        below += len(idx) - len(keep)
        if protos and name in protos and len(keep):
            proto, near = protos[name]
            far = keep[np.asarray(emb[keep], np.float32) @ proto < near]  # unlike the class's own examples
            ok[far] = False
            unlike += len(far)
            keep = np.flatnonzero(ok)
        keep = keep[np.argsort(-s1[keep], kind="stable")]
        out: list[tuple[str, float]] = []
        vecs = np.empty((min(per_class, len(keep)), text.shape[1]), np.float32)
        for r in keep:
            if len(out) >= per_class:
                over += 1
                continue
            v = np.asarray(emb[r], np.float32)
            if out and float(np.max(vecs[:len(out)] @ v)) >= duplicate:
                dup += 1  # a near-copy of an image already chosen: not a new example of anything
                continue
            vecs[len(out)] = v
            out.append((str(index.images_root / index.paths[r]), float(s1[r])))
        chosen[name] = out
        # what the class turned down (the background, the floor or its margin cut), best first: the contact sheet
        turned = np.flatnonzero(alive & (best == c) & ~ok)
        rejected[name] = [(str(index.images_root / index.paths[r]), float(s1[r]))
                          for r in turned[np.argsort(-s1[turned], kind="stable")][:8]]
    reasons.update(margin=below, examples=unlike, duplicate=dup, quota=over)
    return chosen, rejected, reasons, cuts
