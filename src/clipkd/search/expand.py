"""Step 1's image-space rules: how the teacher's image space finds the rest of a class the text scores turned away
(:func:`cluster_decisions`, the default; :func:`expand_seeds`: the candidates it was measured against), and the
verdict codes and Otsu split :mod:`clipkd.search.select` shares with them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ClipkdError

KEPT, BACKGROUND_RULE, FLOOR_RULE, MARGIN_RULE, EXAMPLES_RULE, EXPANDED, CLUSTER_RULE = range(7)  # why (not) kept
RULES = {BACKGROUND_RULE: "background", FLOOR_RULE: "min_similarity", MARGIN_RULE: "margin",
         EXAMPLES_RULE: "examples", CLUSTER_RULE: "cluster"}
BIMODAL = 0.85  # a class's margins are two groups (its own cut) when Otsu's split explains this share of the variance
EXPAND = ("none", "cluster", "split", "seeds", "vote")  # how the image space finds the rest of a class (expand_seeds)


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
    if how not in ("split", "seeds", "vote"):  # "cluster" is cluster_decisions (it also drops rows); "none": nothing
        raise ClipkdError(f"expand_seeds runs split, seeds or vote, not {how!r}")
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
# a cluster is background when more than 5 % of it lost to the background bank (2 % rejected a whole class on the
# demo world's weak pool: 8 of a part of 296 of its own images lost to "a blob"; the digit pools' picks are the same
# at 2-10 %)
CLUSTER_BACKGROUND = 0.05
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


TYPICAL_CORE, TYPICAL_ROUNDS = 0.5, 5  # typicality: a class's centre from the closest half of its picks, 5 rounds


def typicality(v: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """How typical of a class each of its picks is (unit vectors ``v``): the cosine to the class's trimmed centre,
    the mean of the :data:`TYPICAL_CORE` of its picks closest to the centre before (:data:`TYPICAL_ROUNDS` rounds,
    from the mean of all). A class's quota is filled most typical first: lookalikes that outscore its images on its
    prompt sit nearer the text and farther from the images' centre than its own images do. ``centre``: the class's
    centre known already (a class with labelled examples: their mean), the cosine to it."""
    v = np.asarray(v, np.float32)
    if centre is not None:
        return v @ np.asarray(centre, np.float32)
    if len(v) < 3:
        return np.ones(len(v), np.float32)
    core = np.ones(len(v), bool)
    for _ in range(TYPICAL_ROUNDS):
        centre = v[core].mean(0)
        score = v @ (centre / max(float(np.linalg.norm(centre)), 1e-12))
        core = score >= np.quantile(score, 1 - TYPICAL_CORE)
    return score
