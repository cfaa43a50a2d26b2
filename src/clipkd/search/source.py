"""``clipkd source``: the first seed's step 1 on the user's own collection. The teacher embeds an unlabelled pool
once (a search index, whose store ``distill --extra-store`` reuses), every class prompt — seen and unseen: in
generalized zero-shot learning the unseen names are known, only their labelled images are not — picks its best
images (:func:`~clipkd.search.select.select_images`), and a PNG shows what each class got. ``distill
--extra-images SELECTED --extra-store INDEX/store`` then trains on them with teacher targets alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import settle
from ..errors import ClipkdError
from ..fileio import check_can_create, write_json
from ..prompts import DEFAULT_TEMPLATES
from .select import (
    BACKGROUND,
    DUPLICATE_COSINE,
    EXAMPLE_QUANTILE,
    EXPAND_DEFAULT,
    Selection,
    check_selection,
    example_prototypes,
    select_images,
)


@dataclass
class SourcedPool:
    """What :func:`source_pool` wrote: the pool's index (its ``store``: the teacher's embedding of every pool
    image), the selected ``path,label,similarity`` list, its PNG, and the selection itself."""

    index: Path
    store: Path
    selected: Path
    png: Path
    selection: Selection

    def distill_args(self) -> dict[str, Path]:
        """The keywords that train a student on the selection: ``distill(..., **pool.distill_args())``."""
        return {"extra_images": self.selected, "extra_store": self.store}


@dataclass(frozen=True)
class SourceConfig:
    """What :func:`source_pool` selects and how (everything apart from the teacher, the pool and ``out``).

    Class prompts: ``prompts`` (``clipkd prompts``' JSON, or a dict), or ``classes`` (a folder or a class-name file)
    with ``templates``. ``per_class`` / ``min_per_class`` / ``min_similarity`` / ``duplicate`` / ``background`` /
    ``margin``: the text rules of :func:`~clipkd.search.select.select_images`; ``examples`` (with
    ``examples_store``, ``split``, ``example_quantile``): labelled images of some classes that those classes' picks
    must resemble; ``expand``: how the image space finds the rest of a class
    (:func:`~clipkd.search.expand.expand_seeds`); ``device`` / ``batch_size`` / ``workers``: the embedding pass."""

    prompts: str | Path | dict[str, list[str]] | None = None
    classes: str | Path | None = None
    templates: str = DEFAULT_TEMPLATES
    per_class: int = 100
    min_per_class: int = 1
    min_similarity: float = -1.0
    duplicate: float = DUPLICATE_COSINE
    background: Sequence[str] | str | Path | None = BACKGROUND
    margin: float | None = None
    examples: str | Path | None = None
    examples_store: str | Path | None = None
    split: str | Path | None = None
    example_quantile: float = EXAMPLE_QUANTILE
    expand: str = EXPAND_DEFAULT
    device: str | None = "auto"
    batch_size: int = 64
    workers: int | None = None


def source_pool(teacher: str | Path, pool: str | Path, out: str | Path, cfg: SourceConfig | None = None, *,
                progress: bool = True, **settings: Any) -> SourcedPool:
    """Select training images for every class from an unlabelled ``pool`` (a folder, an image list, shards) with
    the ``teacher``'s judgement, as ``cfg`` says (:class:`SourceConfig`; its fields may also be given as keywords,
    on top of it): ``out/index`` (the pool embedded once; re-running resumes), ``out/selected.csv`` (at most
    ``per_class`` images per class, each image for one class, near-copies dropped), ``out/selected.png`` (the
    contact sheet: per class its best and worst kept images and the best it turned down) and ``out/summary.json``
    (:meth:`~clipkd.search.select.Selection.summary`: per class how many it kept and turned down, the short classes
    with why)."""
    from ..prompts import build_prompts, load_classnames, load_templates, read_prompts
    from .planning import IndexConfig
    from .writers import build_index

    c = settle(SourceConfig, cfg, settings, "source_pool", first="prompts")
    if (c.prompts is None) == (c.classes is None):
        raise ClipkdError("give exactly one of `prompts` or `classes`")
    background = check_selection(c.per_class, c.min_per_class, c.margin, c.background, c.examples, c.examples_store,
                                 c.example_quantile, c.expand)
    prompts = c.prompts
    if prompts is None:
        prompts = build_prompts(load_classnames(c.classes), load_templates(c.templates))
    elif not isinstance(prompts, dict):
        prompts = read_prompts(prompts)
    examples = None
    if c.examples is not None:  # read and checked before the pool is embedded (the teacher's identity after)
        examples = example_prototypes(c.examples, c.examples_store, list(prompts), None, c.split, c.example_quantile)
    out = check_can_create(out, "source folder")
    index = build_index(teacher, pool, out / "index", IndexConfig(device=c.device, batch_size=c.batch_size,
                                                                  workers=c.workers), progress=progress)
    selection = select_images(index, prompts, out / "selected.csv", per_class=c.per_class,  # the teacher loaded once
                              min_per_class=c.min_per_class, min_similarity=c.min_similarity, duplicate=c.duplicate,
                              background=background, margin=c.margin, examples=examples, expand=c.expand,
                              device=c.device)
    from ..evaluation.plots import plot_selection

    rows = {str(index.images_root / p): i for i, p in enumerate(index.paths)}
    # the contact sheet: best and worst kept, best rejected, per class how many kept and turned down near the cut
    png = plot_selection(selection.chosen, lambda p: index.open_image(rows[p]), out / "selected.png", shown=9,
                         rejected=selection.rejected, counts=selection.counts)
    write_json(out / "summary.json", selection.summary())
    return SourcedPool(index.root, index.root / "store", selection.out, png, selection)
