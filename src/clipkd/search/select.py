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
classes at 2×).

Text scores alone fail when a class's prompt scores some distractors as high as its own images (a web pool's
lookalikes; ``make bench-gzsl``'s weak-prompt pools): the margin cut then turns real images away and the quota fills
with the distractors. The teacher's *image* space knows better: a class's images sit together and distractors
elsewhere. So by default (``expand="cluster"``, :func:`cluster_decisions`) the pool's mutual nearest-neighbour graph
is split into its connected parts and each part is decided whole: one some of which lost to the background bank is
background (its text picks dropped), one nearly all of whose images score highest on one class whose text picks are
a fair share of it joins that class whole (the real images the cut turned away come back). Measured against the
other candidates (a per-class cut from the class's own picks, kNN voting: :func:`expand_seeds`) on the benchmark's
pools: ``benchmarks/results/gzsl-pool-weak*.md``. A class's quota is then filled most typical first
(:func:`~clipkd.search.expand.typicality`: closest to the trimmed centre of its picks, or to its examples' mean),
not by text score: the
lookalikes a prompt keeps outscore the class's own images on it (they sit nearer the text) and lie off the images'
centre, so ordering by text score filled the quota with them first."""

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
from .expand import (
    BACKGROUND_RULE,
    BIMODAL,
    CLUSTER_RULE,
    EXAMPLES_RULE,
    EXPAND,
    EXPANDED,
    FLOOR_RULE,
    KEPT,
    MARGIN_RULE,
    RULES,
    cluster_decisions,
    expand_seeds,
    otsu,
    typicality,
)
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
EXPAND_DEFAULT = "cluster"  # how the image space finds the rest of a class (expand.py)


@dataclass
class Selection:
    """The chosen images by class (most typical first), the classes below the floor (how many they got), the best images
    each class turned down (for the contact sheet), and how many pool images each rule rejected."""

    chosen: dict[str, list[tuple[str, float]]]
    short: dict[str, int]
    out: Path
    rejected: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    cuts: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    why_short: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a user reads after a selection (``source`` writes it as ``summary.json``): per class how many it
        kept (from the text, from the image space), how many it turned down and how many of those near its cut
        (the margin or the examples), the classes below the floor with why, and each rule's rejections."""
        return {"selected": sum(len(v) for v in self.chosen.values()), "classes": self.counts,
                "short": {c: {"got": n, "why": self.why_short.get(c, "")} for c, n in self.short.items()},
                "rejected_by_rule": self.reasons, "margin_cuts": {c: round(v, 4) for c, v in self.cuts.items()}}


def select_images(index_dir: str | Path | SearchIndex, prompts: str | Path | dict[str, list[str]], out: str | Path,
                  per_class: int = 100, min_per_class: int = 1, min_similarity: float = -1.0,
                  duplicate: float = DUPLICATE_COSINE, background: Sequence[str] | str | Path | None = BACKGROUND,
                  margin: float | None = None, examples: str | Path | ExamplePrototypes | None = None,
                  examples_store: str | Path | None = None, split: str | Path | None = None,
                  example_quantile: float = EXAMPLE_QUANTILE, text_model: str | Path | None = None,
                  expand: str = EXPAND_DEFAULT, device: str | None = "auto", precision: str = "auto") -> Selection:
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
    as ``source`` does before it embeds the pool). ``expand``: the images these rules turned down that the
    teacher's image space puts with a class's kept ones (and its examples) join it (:func:`expand_seeds`:
    ``seeds``, ``vote``; ``none``: the text's picks only). ``text_model``: a distilled student index's teacher.
    ``index_dir`` may be an opened index whose encoder is loaded already (the model is not loaded twice).
    """
    read = examples if isinstance(examples, ExamplePrototypes) else None
    background = check_selection(per_class, min_per_class, margin, background, None if read else examples,
                                 examples_store, example_quantile, expand)
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
    chosen, rejected, reasons, cuts, counts = _assign(
        index, text.embeddings, text.classnames, bank, per_class, min_similarity, duplicate, margin,
        protos and protos.by_class, expand, protos and protos.vectors)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "similarity"])
    here = Path(out).resolve().parent  # paths relative to the list's folder: list and pool move together
    for name, items in chosen.items():
        for path, sim in items:
            w.writerow([Path(os.path.relpath(Path(path).resolve(), here)).as_posix(), name, f"{sim:.4f}"])
    out = write_text(out, buf.getvalue())
    short = {c: len(v) for c, v in chosen.items() if len(v) < min_per_class}
    why = {c: short_reason(counts[c]) for c in short}
    if short:
        log.warning("%d class(es) got fewer than %d images: %s", len(short), min_per_class,
                    "; ".join(f"{c} {n} ({why[c]})" for c, n in list(short.items())[:5]))
    return Selection(chosen, short, Path(out), rejected, reasons, cuts, counts, why)


def short_reason(count: dict[str, int]) -> str:
    """Why a class got few images, from its counts, in words."""
    if not count["kept"] and not count["turned_down"]:
        return "no pool image scores highest on its prompts: the pool may hold none, or its prompts are weak"
    if count["near_cut"]:
        return (f"{count['near_cut']} image(s) scored highest on its prompts but fell below its margin cut or far "
                "from its examples; look at them in the contact sheet, and try --expand or --margin")
    return (f"{count['turned_down']} image(s) scored highest on its prompts but no higher than the background "
            "phrases (--background)")


def check_selection(per_class: int, min_per_class: int, margin: float | None,
                    background: Sequence[str] | str | Path | None, examples: str | Path | None = None,
                    examples_store: str | Path | None = None, example_quantile: float = EXAMPLE_QUANTILE,
                    expand: str = "none") -> list[str]:
    """The selection's settings checked (one line each) before any work; returns the background phrases."""
    if expand not in EXPAND:
        raise ClipkdError(f"`expand` must be one of {', '.join(EXPAND)}, got {expand!r}")
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
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # each class's example embeddings (unit length)

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
    vectors: dict[str, np.ndarray] = {}
    for y in np.unique(labels):
        v = emb[labels == y]
        v /= np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
        p = v.mean(0)
        p /= max(float(np.linalg.norm(p)), 1e-12)
        out[data.classnames[int(y)]] = (p, float(np.quantile(v @ p, quantile)))
        vectors[data.classnames[int(y)]] = v
    protos = ExamplePrototypes(out, st, vectors)
    if teacher is not None:
        protos.check_teacher(teacher)
    return protos


CHUNK = 65_536  # rows scored at a time: memory flat in the pool


@dataclass
class _Scores:
    """Per pool row: its best class, that class's cosine, the margin over the second best, the background's best."""

    best: np.ndarray
    s1: np.ndarray
    gap: np.ndarray
    bg: np.ndarray


def _score(emb: np.ndarray, text: np.ndarray, bank: np.ndarray | None) -> _Scores:
    """Every row against the class texts and the background bank, a chunk at a time."""
    n = len(emb)
    sc = _Scores(np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32),
                 np.full(n, -np.inf, np.float32))
    for start in range(0, n, CHUNK):
        v = np.asarray(emb[start:start + CHUNK], np.float32)
        sims = v @ text.T
        top2 = np.sort(sims, axis=1)[:, -2:] if sims.shape[1] > 1 else np.concatenate([sims, sims - 1], 1)
        part = slice(start, start + len(v))
        sc.best[part], sc.s1[part], sc.gap[part] = sims.argmax(1), top2[:, -1], top2[:, -1] - top2[:, 0]
        if bank is not None:
            sc.bg[part] = (v @ bank.T).max(1)
    return sc


def _text_rules(emb: np.ndarray, sc: _Scores, alive: np.ndarray, classnames: list[str], min_similarity: float,
                margin: float | None, protos: dict[str, tuple[np.ndarray, float]] | None,
                ) -> tuple[np.ndarray, dict[str, float]]:
    """Each live row's verdict from the text (and the examples): :data:`KEPT` for its best class, or the rule that
    turned it down; -1 for a removed row. Returns the verdicts and each class's margin cut."""
    why = np.full(len(emb), -1, np.int64)
    why[alive & (sc.s1 <= sc.bg)] = BACKGROUND_RULE
    why[alive & (sc.s1 > sc.bg) & (sc.s1 < min_similarity)] = FLOOR_RULE
    cand = alive & (sc.s1 > sc.bg) & (sc.s1 >= min_similarity)
    pool_cut, _ = otsu(sc.gap[cand])
    cuts: dict[str, float] = {}
    for c, name in enumerate(classnames):
        mine = cand & (sc.best == c)
        cut, split = otsu(sc.gap[mine])
        cuts[name] = margin if margin is not None else cut if split >= BIMODAL else pool_cut
        why[mine & (sc.gap < cuts[name])] = MARGIN_RULE
        keep = np.flatnonzero(mine & (sc.gap >= cuts[name]))
        if protos and name in protos and len(keep):
            proto, near = protos[name]
            unlike = np.asarray(emb[keep], np.float32) @ proto < near  # unlike the class's own examples
            why[keep[unlike]] = EXAMPLES_RULE
            keep = keep[~unlike]
        why[keep] = KEPT
    return why, cuts


def _assign(index: SearchIndex, text: np.ndarray, classnames: list[str], bank: np.ndarray | None, per_class: int,
            min_similarity: float, duplicate: float,
            margin: float | None = None, protos: dict[str, tuple[np.ndarray, float]] | None = None,
            expand: str = "none", examples: dict[str, np.ndarray] | None = None,
            ) -> tuple[Picks, Picks, dict[str, int], dict[str, float], dict[str, dict[str, int]]]:
    """Each pool image to its best class, kept when it beats the background, clears the class's margin cut and
    (for a class with examples) lies as close to their mean as most of them; with ``expand``, the rows these rules
    turned down that the image space puts with a class's kept ones (:func:`expand_seeds`) join it. Returns the
    picks, the best rows each class turned down, the rules' rejections, the margin cuts and per-class counts."""
    emb = index.store.embeddings()
    sc = _score(emb, text, bank)
    alive = np.asarray(index.live[:len(emb)], bool)  # removed rows are not candidates
    why, cuts = _text_rules(emb, sc, alive, classnames, min_similarity, margin, protos)
    owner = np.where(why == KEPT, sc.best, -1)
    if expand == "cluster":
        joined = cluster_decisions(emb, why, sc.best, alive, classnames, protos, getattr(index, "search_vectors", None))
        owner[joined == -2], why[joined == -2] = -1, CLUSTER_RULE
        owner[joined >= 0], why[joined >= 0] = joined[joined >= 0], EXPANDED
    elif expand != "none":
        joined = expand_seeds(emb, owner, alive, len(classnames), expand, examples and {
            classnames.index(c): v for c, v in examples.items() if c in classnames}, sc.best)
        owner[joined >= 0], why[joined >= 0] = joined[joined >= 0], EXPANDED
    chosen, rejected, counts, dup, over = _fill(index, emb, owner, why, sc, classnames, per_class, duplicate, protos)
    reasons = {name: int(np.sum(why == code)) for code, name in RULES.items()}
    reasons.update(duplicate=dup, quota=over)
    return chosen, rejected, reasons, cuts, counts


def _fill(index: SearchIndex, emb: np.ndarray, owner: np.ndarray, why: np.ndarray, sc: _Scores,
          classnames: list[str], per_class: int, duplicate: float,
          protos: dict[str, tuple[np.ndarray, float]] | None = None,
          ) -> tuple[Picks, Picks, dict[str, dict[str, int]], int, int]:
    """Each class's rows most typical first (:func:`typicality`: closest to the centre of its picks, the text's and
    the image space's alike; a class with examples: closest to their mean), near-copies dropped, up to the quota;
    what it turned down (best first: the contact sheet); per class how many the text kept, the image space added,
    the quota left and it turned down."""
    chosen: Picks = {}
    rejected: Picks = {}
    counts: dict[str, dict[str, int]] = {}
    dup = over = 0
    for c, name in enumerate(classnames):
        rows = np.flatnonzero(owner == c)
        centre = (protos or {}).get(name, (None,))[0]
        rows = rows[np.argsort(-typicality(emb[rows], centre), kind="stable")]
        out: list[tuple[str, float]] = []
        vecs = np.empty((min(per_class, len(rows)), emb.shape[1]), np.float32)
        for r in rows:
            if len(out) >= per_class:
                over += 1
                continue
            v = np.asarray(emb[r], np.float32)
            if out and float(np.max(vecs[:len(out)] @ v)) >= duplicate:
                dup += 1  # a near-copy of an image already chosen: not a new example of anything
                continue
            vecs[len(out)] = v
            out.append((str(index.images_root / index.paths[r]), float(sc.s1[r])))
        chosen[name] = out
        # what the class turned down (the background, the floor, its margin cut or its examples), best first
        turned = np.flatnonzero((why > KEPT) & (why != EXPANDED) & (sc.best == c) & (owner < 0))
        rejected[name] = [(str(index.images_root / index.paths[r]), float(sc.s1[r]))
                          for r in turned[np.argsort(-sc.s1[turned], kind="stable")][:8]]
        counts[name] = {"kept": len(out), "text": int(np.sum(why[rows] == KEPT)),
                        "image_space": int(np.sum(why[rows] == EXPANDED)),
                        "turned_down": int(len(turned)),
                        "near_cut": int(np.sum(np.isin(why[turned], (MARGIN_RULE, EXAMPLES_RULE))))}
    return chosen, rejected, counts, dup, over
