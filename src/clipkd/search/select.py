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
pools: ``benchmarks/results/gzsl-pool-weak*.md``."""

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
EXPAND = ("none", "cluster", "split", "seeds", "vote")  # how the image space finds the rest of a class (expand_seeds)
EXPAND_DEFAULT = "cluster"
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
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    why_short: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a user reads after a selection (``source`` writes it as ``summary.json``): per class how many it
        kept (from the text, from the image space), how many it turned down and how many of those near its cut
        (the margin or the examples), the classes below the floor with why, and each rule's rejections."""
        return {"selected": sum(len(v) for v in self.chosen.values()), "classes": self.counts,
                "short": {c: {"got": n, "why": self.why_short.get(c, "")} for c, n in self.short.items()},
                "rejected_by_rule": self.reasons, "margin_cuts": {c: round(v, 4) for c, v in self.cuts.items()}}


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


KEPT, BACKGROUND_RULE, FLOOR_RULE, MARGIN_RULE, EXAMPLES_RULE, EXPANDED, CLUSTER_RULE = range(7)  # why (not) kept
RULES = {BACKGROUND_RULE: "background", FLOOR_RULE: "min_similarity", MARGIN_RULE: "margin",
         EXAMPLES_RULE: "examples", CLUSTER_RULE: "cluster"}
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
    chosen, rejected, counts, dup, over = _fill(index, emb, owner, why, sc, classnames, per_class, duplicate)
    reasons = {name: int(np.sum(why == code)) for code, name in RULES.items()}
    reasons.update(duplicate=dup, quota=over)
    return chosen, rejected, reasons, cuts, counts


def _fill(index: SearchIndex, emb: np.ndarray, owner: np.ndarray, why: np.ndarray, sc: _Scores,
          classnames: list[str], per_class: int, duplicate: float,
          ) -> tuple[Picks, Picks, dict[str, dict[str, int]], int, int]:
    """Each class's rows best first (the text's picks, then the image space's), near-copies dropped, up to the
    quota; what it turned down (best first: the contact sheet); per class how many the text kept, the image space
    added, the quota left and it turned down."""
    chosen: Picks = {}
    rejected: Picks = {}
    counts: dict[str, dict[str, int]] = {}
    dup = over = 0
    for c, name in enumerate(classnames):
        rows = np.flatnonzero(owner == c)
        rows = rows[np.lexsort((-sc.s1[rows], why[rows] == EXPANDED))]
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


SEED_NEIGHBOURS = 5  # "seeds": a row's closeness to a class is its mean cosine to the class's 5 nearest seeds
SEED_QUANTILE = 0.05  # ... and it joins when as close as all but 5 % of the seeds are to the others
VOTE_K, VOTE_SHARE, VOTE_ROUNDS = 10, 0.3, 5  # "vote": 3 of its 10 nearest neighbours, the most of any class


def expand_seeds(emb: np.ndarray, owner: np.ndarray, alive: np.ndarray, n_classes: int, how: str,
                 examples: dict[int, np.ndarray] | None = None, best: np.ndarray | None = None) -> np.ndarray:
    """The class each live row that the text rules turned down joins through the teacher's image space (-1: none),
    from the rows they kept (``owner``) and the labelled ``examples`` (class → unit vectors) as seeds. ``split``:
    among the rows whose best class is that class (``best``), those whose closeness to its seeds falls in the seeds'
    group of Otsu's two-group split of the seeds' and the rows' closeness (one group: the rows join when they are as
    close as all but :data:`SEED_QUANTILE` of the seeds are to the others). ``seeds``: a
    per-class cut from the class's own seeds (closeness: mean cosine to the nearest :data:`SEED_NEIGHBOURS` seeds;
    a row joins when it is as close as all but :data:`SEED_QUANTILE` of the seeds are to the others);
    ``vote``: label propagation over the pool's nearest neighbours (a row joins the class that holds the most, and at
    least :data:`VOTE_SHARE`, of its :data:`VOTE_K` neighbours; :data:`VOTE_ROUNDS` rounds, joined rows voting)."""
    if how not in EXPAND:
        raise ClipkdError(f"unknown expansion {how!r}: choose from {', '.join(EXPAND)}")
    seeds = {c: np.asarray(emb[owner == c], np.float32) for c in range(n_classes)}
    for c, v in (examples or {}).items():
        seeds[c] = np.concatenate([seeds[c], np.asarray(v, np.float32)])
    todo = np.flatnonzero(alive & (owner < 0))
    joined = np.full(len(owner), -1, np.int64)
    if not len(todo):
        return joined
    if how == "split":
        joined[todo] = _seed_split(np.asarray(emb[todo], np.float32), seeds, best[todo])
    elif how == "seeds":
        joined[todo] = _seed_cut(np.asarray(emb[todo], np.float32), seeds)
    elif how == "vote":
        joined[todo] = _vote(emb, owner, alive, todo, examples or {})
    return joined


def _nearest_mean(q: np.ndarray, ref: np.ndarray, m: int, self_match: bool = False) -> np.ndarray:
    """Each query's mean cosine to its ``m`` nearest rows of ``ref`` (``self_match``: the query's own row, its
    nearest, left out)."""
    out = np.empty(len(q), np.float32)
    for start in range(0, len(q), 4096):
        sims = q[start:start + 4096] @ ref.T
        take = min(m + self_match, sims.shape[1])
        top = -np.partition(-sims, take - 1, axis=1)[:, :take]
        top = np.sort(top, axis=1)[:, self_match:] if self_match else top
        out[start:start + len(top)] = top.mean(1)
    return out


def _self_closeness(v: np.ndarray) -> np.ndarray:
    """Each seed's closeness to the others (a sample of 4,096 seeds at most)."""
    sample = v if len(v) <= 4096 else v[np.random.default_rng(0).choice(len(v), 4096, replace=False)]
    return _nearest_mean(sample, v, SEED_NEIGHBOURS, self_match=True)


def _seed_split(q: np.ndarray, seeds: dict[int, np.ndarray], best: np.ndarray) -> np.ndarray:
    """``split`` expansion: the class each query row joins (-1 none), among those its text puts first."""
    out = np.full(len(q), -1, np.int64)
    for c, v in seeds.items():
        mine = np.flatnonzero(best == c)
        if len(v) <= SEED_NEIGHBOURS or not len(mine):
            continue
        own, near = _self_closeness(v), _nearest_mean(q[mine], v, SEED_NEIGHBOURS)
        cut, share = otsu(np.concatenate([own, near]))
        if share < BIMODAL:  # one group: the rows are like the seeds, or all unlike them
            cut = float(np.quantile(own, SEED_QUANTILE))
        out[mine[near >= cut]] = c
    return out


def _seed_cut(q: np.ndarray, seeds: dict[int, np.ndarray]) -> np.ndarray:
    """``seeds`` expansion: each query row's class (-1 none), the one it clears the cut of by the most."""
    best, by = np.full(len(q), -1, np.int64), np.full(len(q), -np.inf, np.float32)
    for c, v in seeds.items():
        if len(v) <= SEED_NEIGHBOURS:  # too few seeds to tell how close a class's own images lie
            continue
        cut = float(np.quantile(_self_closeness(v), SEED_QUANTILE))
        over = _nearest_mean(q, v, SEED_NEIGHBOURS) - cut
        win = (over >= 0) & (over > by)
        best[win], by[win] = c, over[win]
    return best


def _vote(emb: np.ndarray, owner: np.ndarray, alive: np.ndarray, todo: np.ndarray,
          examples: dict[int, np.ndarray]) -> np.ndarray:
    """``vote`` expansion: the class each ``todo`` row joins (-1 none) by kNN voting, rounds until nothing joins."""
    live = np.flatnonzero(alive)
    ref = [np.asarray(emb[live], np.float32)] + [np.asarray(v, np.float32) for v in examples.values()]
    ref_label = np.concatenate([owner[live]] + [np.full(len(v), c) for c, v in examples.items()])
    ref_row = np.concatenate([live, np.full(len(ref_label) - len(live), -1)])
    ref = np.concatenate(ref)
    nbr = np.empty((len(todo), VOTE_K), np.int64)
    for start in range(0, len(todo), 4096):
        part = todo[start:start + 4096]
        sims = np.asarray(emb[part], np.float32) @ ref.T
        sims[ref_row[None, :] == part[:, None]] = -np.inf  # not its own neighbour
        nbr[start:start + len(part)] = np.argpartition(-sims, VOTE_K - 1, axis=1)[:, :VOTE_K]
    label = ref_label.copy()
    pos = np.searchsorted(live, todo)  # the todo rows' places among the live reference rows
    out = np.full(len(todo), -1, np.int64)
    for _ in range(VOTE_ROUNDS):
        lab = label[nbr]
        votes = np.stack([(lab == lab[:, [j]]) & (lab[:, [j]] >= 0) for j in range(VOTE_K)], 1).sum(2)
        top = votes.argmax(1)
        count = votes[np.arange(len(top)), top]
        win = (out < 0) & (count >= VOTE_SHARE * VOTE_K) & (lab[np.arange(len(top)), top] >= 0)
        # the most of any class: no other class as many votes
        second = np.where(lab == lab[np.arange(len(top)), top][:, None], 0, votes).max(1)
        win &= count > second
        if not win.any():
            break
        out[win] = lab[np.arange(len(top)), top][win]
        label[pos[win]] = out[win]
    return out


CLUSTER_K = 10  # "cluster": the pool's mutual 10-nearest-neighbour graph, its connected parts the clusters
CLUSTER_BACKGROUND = 0.02  # a cluster is background when more than 2 % of it lost to the background bank
CLUSTER_PURITY = 0.9  # ... and a class's when at least 90 % of it scores highest on that class's prompts
CLUSTER_SEEDS = 0.2  # ... and the text kept at least a fifth of it
CLUSTER_MIN = 5  # smaller clusters: their rows keep the text's verdict
EXACT_ROWS = 100_000  # pools up to this many live rows: exact neighbours; larger ones: the index's own search


def cluster_decisions(emb: np.ndarray, why: np.ndarray, best: np.ndarray, alive: np.ndarray,
                      classnames: list[str], protos: dict[str, tuple[np.ndarray, float]] | None = None,
                      search: Any = None) -> np.ndarray:
    """Cluster-level decisions: the live rows split into the connected parts of their mutual
    :data:`CLUSTER_K`-nearest-neighbour graph in the teacher's image space (images of one class sit together,
    distractors elsewhere), and each part of at least :data:`CLUSTER_MIN` rows is decided whole: rejected when more
    than :data:`CLUSTER_BACKGROUND` of it lost to the background bank or (for a class with examples) most of it lies
    farther from the examples' mean than their cut; kept for a class when at least :data:`CLUSTER_PURITY` of it scores
    highest on that class's prompts and the text rules kept at least :data:`CLUSTER_SEEDS` of it. Per row: the class
    it joins, -2 when its cluster rejects a row the text kept, -1 when nothing changes. Neighbours: exact up to
    :data:`EXACT_ROWS` live rows, else through ``search`` (the pool index's own ``search_vectors``)."""
    live = np.flatnonzero(alive)
    out = np.full(len(why), -1, np.int64)
    if len(live) <= CLUSTER_K:
        return out
    v = np.asarray(emb[live], np.float32)
    part = _components(len(live), _mutual_knn(v, CLUSTER_K, None if len(live) <= EXACT_ROWS else search, live))
    size = np.bincount(part)
    for g in np.flatnonzero(size >= CLUSTER_MIN):
        rows = live[part == g]
        if np.mean(why[rows] == BACKGROUND_RULE) > CLUSTER_BACKGROUND:  # of the background, whatever its text says
            out[rows[(why[rows] == KEPT)]] = -2
            continue
        votes = np.bincount(best[rows], minlength=len(classnames))
        c = int(votes.argmax())
        if votes[c] < CLUSTER_PURITY * len(rows):
            continue
        proto = (protos or {}).get(classnames[c])
        if proto is not None and np.mean(np.asarray(emb[rows], np.float32) @ proto[0] < proto[1]) > 0.5:
            out[rows[(why[rows] == KEPT)]] = -2  # unlike the class's examples
        elif np.mean(why[rows] == KEPT) >= CLUSTER_SEEDS:
            out[rows[(why[rows] != KEPT) | (best[rows] != c)]] = c
    return out


def _mutual_knn(v: np.ndarray, k: int, search: Any = None, rows: np.ndarray | None = None) -> np.ndarray:
    """The edges (pairs of positions in ``v``) between rows each among the other's ``k`` nearest by cosine: exact,
    or with ``search`` (queries, k) → (scores, index rows), whose rows ``rows`` maps to positions."""
    nbr = np.full((len(v), k), -1, np.int64)
    pos = None
    if search is not None:
        pos = np.full(int(rows.max()) + 1, -1, np.int64)
        pos[rows] = np.arange(len(rows))
    for start in range(0, len(v), 4096):
        q = v[start:start + 4096]
        if pos is None:
            sims = q @ v.T
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf  # not its own neighbour
            nbr[start:start + len(q)] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            found = search(q, k + 1)[1]
            found = np.where((found >= 0) & (found < len(pos)), pos[found.clip(0, len(pos) - 1)], -1)
            for i, f in enumerate(found):
                f = f[(f >= 0) & (f != start + i)][:k]
                nbr[start + i, :len(f)] = f
    a = np.repeat(np.arange(len(v)), k)
    b = nbr.ravel()
    a, b = a[b >= 0], b[b >= 0]
    key = np.minimum(a, b) * len(v) + np.maximum(a, b)
    uniq, count = np.unique(key, return_counts=True)
    both = uniq[count == 2]  # each of the pair lists the other
    return np.stack([both // len(v), both % len(v)], 1)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected parts of a graph of ``n`` nodes: each node's part number (0, 1, ...)."""
    parent = np.arange(n)
    a, b = edges[:, 0], edges[:, 1]
    while len(a):
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            break
        lo = np.minimum(ra, rb)
        np.minimum.at(parent, ra, lo)
        np.minimum.at(parent, rb, lo)
        while True:  # every node straight to its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return np.unique(parent, return_inverse=True)[1]
