"""PNG plots: seen–unseen curves, training curves, result bars."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..fileio import atomic_write  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def plot_gzsl_curves(curves: Mapping[str, dict], path: str | Path, title: str = "Seen–unseen accuracy") -> Path:
    """One U-vs-S curve per model; ``curves[name] = {"S": [...], "U": [...], "ausuc", "S0", "U0"}``."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, c in curves.items():
        line, = ax.plot(c["S"], c["U"], label=f"{name} (AUSUC {c['ausuc']:.3f})")
        ax.plot([c["S0"]], [c["U0"]], "o", color=line.get_color())
    ax.set(xlabel="S: seen-class accuracy", ylabel="U: unseen-class accuracy", xlim=(0, 1.02), ylim=(0, 1.02),
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_training_curves(metrics_csvs: list[Path], path: str | Path) -> Path | None:
    """Plot every ``*_epoch`` loss column of Lightning CSV logs (earlier segments first) against the epoch,
    and the ``val/*`` metrics beside them when the run validated."""
    rows: list[dict[str, str]] = []
    for metrics_csv in sorted(metrics_csvs, key=lambda p: (p.name == "metrics.csv", p.name)):
        with Path(metrics_csv).open(newline="") as f:
            rows.extend(csv.DictReader(f))
    losses = sorted({k for r in rows for k, v in r.items() if k.endswith("_epoch") and v})
    vals = sorted({k for r in rows for k, v in r.items() if k.startswith("val/") and v})
    if not losses:
        return None
    fig, axes = plt.subplots(1, 2 if vals else 1, figsize=(11 if vals else 6, 4), squeeze=False)
    for ax, cols, ylabel, title in ((axes[0, 0], losses, "loss", "Training curves"),
                                    (axes[0, -1], vals, "fraction", "Validation retrieval")):
        if not cols:
            continue
        for col in cols:
            pts = [(float(r["epoch"]), float(r[col])) for r in rows if r.get(col)]
            ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", label=col.removesuffix("_epoch"))
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_results_bars(results: Mapping[str, Mapping[str, float]], path: str | Path,
                      keys: tuple[str, ...] = ("S", "U", "H"), title: str = "Generalized zero-shot",
                      ylabel: str = "accuracy") -> Path:
    """Grouped bars of ``keys`` for each model."""
    import numpy as np

    names = list(results)
    x = np.arange(len(names))
    w = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for i, k in enumerate(keys):
        vals = [results[n].get(k, 0.0) for n in names]
        bars = ax.bar(x + (i - (len(keys) - 1) / 2) * w, vals, w, label=k)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1.1), ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_retrieval_grid(emb, paths: Sequence[str], labels: Sequence[int], open_image: Callable[[str], Any],
                        path: str | Path, n_queries: int = 6, k: int = 10, seed: int = 0) -> Path:
    """Rows of (query, its top-``k`` other images); results framed green when relevant, red when not."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    queries = rng.choice(len(paths), min(n_queries, len(paths)), replace=False)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.2 * (k + 1), 1.3 * len(queries)), squeeze=False)
    for row, q in zip(axes, queries, strict=True):
        sim = emb.float() @ emb[int(q)].float()
        sim[int(q)] = float("-inf")
        top = torch.topk(sim, min(k, len(paths) - 1)).indices.tolist()
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.imshow(open_image(paths[q]))
                ax.set_title("query", fontsize=7)
                continue
            if j > len(top):
                ax.axis("off")
                continue
            i = top[j - 1]
            ax.imshow(open_image(paths[i]))
            colour = "tab:green" if labels[i] == labels[q] else "tab:red"
            for spine in ax.spines.values():
                spine.set(color=colour, linewidth=3)
            ax.set_title(f"{j}", fontsize=7)
    fig.suptitle("Image→image retrieval: query, then top results (green = same label)", fontsize=9)
    return _save(fig, path)


def plot_search_grid(query: Any, query_title: str, hits: Sequence[dict], open_image: Callable[[str], Any],
                     path: str | Path, per_row: int = 6) -> Path:
    """A query (an image, or ``None`` with a text title) followed by its results, each titled by rank and score."""
    n = len(hits) + 1
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(1.8 * per_row, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    first = axes.flat[0]
    if query is not None:
        first.imshow(query)
    else:
        first.text(0.5, 0.5, query_title, ha="center", va="center", wrap=True, fontsize=9)
    first.set_title("query", fontsize=8)
    for ax, (rank, hit) in zip(axes.flat[1:], enumerate(hits, 1), strict=False):
        try:
            ax.imshow(open_image(hit["path"]))
        except Exception:  # noqa: BLE001 - a file gone since indexing: leave its cell blank
            ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=8)
        label = f" {hit['label']}" if hit.get("label") else ""
        ax.set_title(f"{rank}. {hit['score']:.3f}{label}", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_selection(chosen: Mapping[str, Sequence[tuple[str, float]]], open_image: Callable[[str], Any],
                   path: str | Path, shown: int = 8, correct: Callable[[str, str], bool | None] | None = None,
                   rejected: Mapping[str, Sequence[tuple[str, float]]] | None = None,
                   counts: Mapping[str, Mapping[str, int]] | None = None) -> Path:
    """A contact sheet of what a teacher selected from a pool for each class prompt: one row per class. Without
    ``rejected``: its ``shown`` best images. With ``rejected`` (the best-scoring images the selection turned down
    for the class): its best kept, its worst kept and its best rejected, a third of ``shown`` each, so a user sees
    where the cut fell. Each cell: the similarity to the class's text. ``correct(path, class)``: where the truth is
    known (a benchmark pool), a green or red frame. ``counts`` (the selection's per-class counts): each row also says
    how many the class kept (how many of them through the image space) and turned down near its cut."""
    classes = list(chosen)
    rows = max(1, len(classes))
    third = max(1, shown // 3)
    cols = shown if rejected is None else 3 * third
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.1 * (cols + 1), 1.15 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, name in enumerate(classes):
        kept = list(chosen[name])
        n = (counts or {}).get(name)
        label = f"{name}\n({len(kept)})" if n is None else (
            f"{name}\nkept {n['kept']}" + (f" ({n['image_space']} image)" if n.get("image_space") else "")
            + f"\nnear cut {n['near_cut']}")
        axes[r][0].text(1.0, 0.5, label, ha="right", va="center", fontsize=7)
        if rejected is None:
            cells = [(p, s, "") for p, s in kept[:shown]]
        else:
            best, worst = kept[:third], kept[third:][-third:]
            cells = [(p, s, "kept") for p, s in best] + [None] * (third - len(best))
            cells += [(p, s, "worst kept") for p, s in worst] + [None] * (third - len(worst))
            cells += [(p, s, "rejected") for p, s in list(rejected.get(name, ()))[:third]]
        for c, cell in enumerate(cells, 1):
            if cell is None:
                continue
            p, score, what = cell
            ax = axes[r][c]
            try:
                ax.imshow(open_image(p))
            except Exception:  # noqa: BLE001 - a file gone since indexing: leave its cell blank
                continue
            ax.set_title(f"{what} {score:.2f}".strip(), fontsize=5 if what else 6)
            ok = correct(p, name) if correct is not None else None
            if ok is not None:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set(color="tab:green" if ok else "tab:red", linewidth=2)
    title = ("Selected from the pool per class prompt (most typical first; similarity to the class's text)"
             if rejected is None else
             f"Per class: the {third} most typical kept, the {third} least typical kept and the {third} best "
             "rejected (similarity to the class's text)")
    height = 1.15 * rows + 0.3
    fig.suptitle(title, fontsize=8, y=1 - 0.05 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))  # the title's 0.3 in above the first row, however tall
    return _save(fig, path)
