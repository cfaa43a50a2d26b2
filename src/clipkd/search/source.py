"""``clipkd source``: the first seed's step 1 on the user's own collection. The teacher embeds an unlabelled pool
once (a search index, whose store ``distill --extra-store`` reuses), every class prompt — seen and unseen: in
generalized zero-shot learning the unseen names are known, only their labelled images are not — picks its best
images (:func:`~clipkd.search.select.select_images`), and a PNG shows what each class got. ``distill
--extra-images SELECTED --extra-store INDEX/store`` then trains on them with teacher targets alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def source_pool(teacher: str | Path, pool: str | Path, out: str | Path,
                prompts: str | Path | dict[str, list[str]] | None = None, classes: str | Path | None = None,
                templates: str = DEFAULT_TEMPLATES, per_class: int = 100, min_per_class: int = 1,
                min_similarity: float = -1.0, duplicate: float = DUPLICATE_COSINE,
                background: Sequence[str] | str | Path | None = BACKGROUND, margin: float | None = None,
                examples: str | Path | None = None, examples_store: str | Path | None = None,
                split: str | Path | None = None, example_quantile: float = EXAMPLE_QUANTILE,
                expand: str = EXPAND_DEFAULT, device: str | None = "auto", batch_size: int = 64,
                workers: int | None = None, progress: bool = True) -> SourcedPool:
    """Select training images for every class from an unlabelled ``pool`` (a folder, an image list, shards) with
    the ``teacher``'s judgement: ``out/index`` (the pool embedded once; re-running resumes), ``out/selected.csv``
    (at most ``per_class`` images per class, each image for one class, near-copies dropped) and
    ``out/selected.png`` (the contact sheet: per class its best and worst kept images and the best it turned
    down) and ``out/summary.json`` (:meth:`~clipkd.search.select.Selection.summary`: per class how many it kept and
    turned down, the short classes with why). Class prompts: ``prompts`` (``clipkd prompts``), or ``classes`` (a
    folder or a class-name file) with ``templates``. ``examples`` (with ``examples_store``, ``split``): labelled
    images of some classes — the seen classes' training images and their store — that those classes' picks must
    resemble
    (:func:`~clipkd.search.select.select_images`). ``expand``: how the teacher's image space finds the rest of a
    class from its picks (:func:`~clipkd.search.select.expand_seeds`)."""
    from ..prompts import build_prompts, load_classnames, load_templates, read_prompts
    from .writers import build_index

    if (prompts is None) == (classes is None):
        raise ClipkdError("give exactly one of `prompts` or `classes`")
    background = check_selection(per_class, min_per_class, margin, background, examples, examples_store,
                                 example_quantile, expand)
    if prompts is None:
        prompts = build_prompts(load_classnames(classes), load_templates(templates))
    elif not isinstance(prompts, dict):
        prompts = read_prompts(prompts)
    if examples is not None:  # read and checked before the pool is embedded (the teacher's identity after)
        examples = example_prototypes(examples, examples_store, list(prompts), None, split, example_quantile)
    out = check_can_create(out, "source folder")
    index = build_index(teacher, pool, out / "index", device=device, batch_size=batch_size, workers=workers,
                        progress=progress)
    selection = select_images(index, prompts, out / "selected.csv", per_class=per_class,  # the teacher loaded once
                              min_per_class=min_per_class, min_similarity=min_similarity, duplicate=duplicate,
                              background=background, margin=margin, examples=examples, expand=expand,
                              device=device)
    from ..evaluation.plots import plot_selection

    rows = {str(index.images_root / p): i for i, p in enumerate(index.paths)}
    # the contact sheet: best and worst kept, best rejected, per class how many kept and turned down near the cut
    png = plot_selection(selection.chosen, lambda p: index.open_image(rows[p]), out / "selected.png", shown=9,
                         rejected=selection.rejected, counts=selection.counts)
    write_json(out / "summary.json", selection.summary())
    return SourcedPool(index.root, index.root / "store", selection.out, png, selection)
