"""The embedding pipeline: images (a folder, list, shards, TSV; or views of them) → a teacher's embeddings in a store,
resumable, the work split between the ranks of a job."""


from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.tars import content_fingerprint
from ..distributed import check_peers, my_share, ranks
from ..errors import ClipkdError
from ..fileio import check_can_create, check_out_dir, exclusive

if TYPE_CHECKING:
    pass
from .reader import EmbeddingStore
from .writer import ShardWriter, file_size, open_for_append

log = logging.getLogger("clipkd.store")


def embed_images(
    teacher,
    images: str | Path,
    out: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    shard_size: int = 8192,
    progress: bool = True,
    max_images: int | None = None,
    compile: bool = False,
    device: str | None = "auto",
    precision: str = "auto",
    views: int = 1,
    view_hue: float | str = "auto",
    view_mix: str = "cutmix",
    split: str | Path | None = None,
    seed: int = 0,
) -> EmbeddingStore:
    """Embed every image of ``images`` (a folder, a ``path,label`` list, WebDataset shards or a Chinese-CLIP TSV:
    :func:`~clipkd.data.sources.open_source`) into the store at ``out`` (resuming).

    Images already in a finished shard (or recorded as skipped) are not recomputed; files that
    cannot be decoded are skipped and listed in the manifest. ``max_images`` stops after that
    many new images (used to test resumption). ``compile`` runs the image tower through
    ``torch.compile`` (checked against eager on the first batch; off by default: on a 2-core CPU it
    measured between -6 % and +3 % end to end, see benchmarks/bench_embed.py). ``teacher``: a loaded model, or a
    spec / ``clip-train`` run folder loaded on ``device`` once the images are found.

    ``views`` > 1: a **multi-view store** (clipkd's GZSL method, for every student that trains from it): each image
    and ``views``-1 views of it — flipped, mixed with a partner image by ``view_mix`` (CutMix by default), a share
    ``view_hue`` of them recoloured (``auto``: 0.5) — drawn once from ``seed``
    (:func:`~clipkd.data.views.make_view_plan`) and embedded once. With ``split``, only the seen classes' images get
    views, so a view and its partner are both of seen classes.
    """
    from ..data.sources import open_source

    src = open_source(images)  # shards: rows keyed <shard>/<sample key>, each rank reading its own shards
    from ..data.views import count_views, resolve_view_hue

    views = count_views(views)
    if split is not None and not views:
        raise ClipkdError("a `split` limits the images that get views (`views` ≥ 2); a plain store embeds every "
                          "image")
    hue = resolve_view_hue(view_hue, bool(views),
                           "`views` ≥ 2 (a plain store embeds the images as they are)")
    plan = _view_plan(src, images, views, hue, view_mix, split, seed) if views else None
    check_can_create(out, "embedding store")  # before a teacher loads (nothing is created until the work starts)
    if isinstance(teacher, (str, Path)):
        from ..teachers import load_teacher

        teacher = load_teacher(teacher, device, precision)
    if plan is not None:
        return embed_views(teacher, src.root, plan, out, batch_size, workers, progress, max_images)
    keys = list(dict.fromkeys(src.keys)) if src.kind == "list" else src.keys  # a list's paths key the store
    return embed_paths(teacher, src.root, keys, out, batch_size, workers, shard_size, progress, max_images, compile,
                       opener=src.opener, group=src.group, fingerprint=src.fingerprint)


def _view_plan(src, images, views: int, view_hue: float, mix: str, split, seed: int):
    """The checked plan of a multi-view store, before any teacher loads (errors name the API's fields);
    ``view_hue`` as :func:`~clipkd.data.views.resolve_view_hue` read it."""
    from ..data.views import make_view_plan

    if src.kind == "tsv":
        raise ClipkdError(f"{images} is a Chinese-CLIP TSV: views are composed from image files or shard samples")
    if split is not None:
        from ..data.datasets import seen_images

        data, _ = seen_images(images, split)
        keys = list(dict.fromkeys(data.paths))
    else:
        keys = list(dict.fromkeys(src.keys))
    return make_view_plan(keys, views, mix, flip=True, seed=seed, hue_prob=float(view_hue))


def embed_paths(teacher, root: str | Path, files: Sequence[str], out: str | Path, batch_size: int = 64,
                workers: int | None = None, shard_size: int = 8192, progress: bool = True,
                max_images: int | None = None, compile: bool = False, opener=None, group=None,
                fingerprint=None) -> EmbeddingStore:
    """Embed the images ``root/f`` for ``f`` in ``files`` into the store at ``out``: the work behind
    :func:`embed_images`, for callers that choose the files themselves (the search index keys rows by absolute
    path, with ``root="/"``). ``opener(key)``: decodes images that are not files (rows of a Chinese-CLIP TSV;
    their recorded size is -1; ``fingerprint(key)``: their content fingerprint, recorded and checked as a file's
    is). ``group(key)``: what ranks split by (default: the key; a tar sample's shard, so that each rank reads its
    own shards)."""
    root, out = Path(root), Path(out)
    if batch_size < 1 or shard_size < 1 or (workers is not None and workers < 0):
        raise ClipkdError(f"batch size and shard size must be ≥ 1 and workers ≥ 0 (got {batch_size}, {shard_size}, "
                          f"{workers})")
    r = ranks()
    if r.distributed:
        check_peers(check_out_dir(out, "store"), "the embedding store")  # leftover launcher variables: refused
    # the ranks of one job share the store (their shards are merged under the manifest lock); other jobs wait
    with exclusive(out, "embedding store") if not r.distributed else nullcontext(check_out_dir(out, "store")):
        manifest, done = open_for_append(teacher.describe(), root, out, shard_size, files, fingerprint)
        pending = my_share([f for f in files if f not in done], r, group)
        if max_images is not None:
            pending = pending[:max_images]
        writer = ShardWriter(out, manifest, shard_size, done)
        if not pending:
            writer.flush(final=True)
            _warn_share_only(r, out, len(files))
            return EmbeddingStore(out)

        if compile:
            teacher.compile_image_tower(batch_size)
        from ..data.encode import iter_encoded
        from ..data.loader import ImageDataset

        draft = max(manifest["preprocess"].get("size") or [0]) or None
        dataset = ImageDataset(root, pending, teacher.preprocess, draft_size=draft, opener=opener)
        desc = f"embed-images [rank {r.rank}/{r.world}]" if r.distributed else "embed-images"
        for b in iter_encoded(teacher.encode_image, dataset, batch_size, workers, progress, desc=desc):
            for idx, err in b.skipped:
                writer.skip(pending[idx], err)
            if b.outputs is not None:
                done_now = [pending[i] for i in b.index]
                not_files = opener is not None or group is not None  # TSV rows, tar samples: no size to record
                sizes = [-1] * len(done_now) if not_files else [file_size(root / p) for p in done_now]
                if fingerprint is not None:  # TSV rows: the source's own fingerprint
                    prints = [fingerprint(p) for p in done_now]
                elif opener is not None and group is None:  # views: their plan records their images' prints
                    prints = [-1] * len(done_now)
                else:  # files and tar samples: from their bytes (a sample's in its shard)
                    prints = [content_fingerprint(root / p) for p in done_now]
                writer.add(b.outputs.numpy(), done_now, sizes, prints)
        writer.flush(final=True)
        if writer.skipped_count:
            log.warning("%d image(s) could not be decoded and were skipped; listed in %s", writer.skipped_count,
                        out / "manifest.json")
        _warn_share_only(r, out, len(files))
        return EmbeddingStore(out)


def _warn_share_only(r, out: Path, total: int) -> None:
    """A rank embeds its share only; when launcher variables (``RANK``/``WORLD_SIZE``, ``SLURM_NTASKS``) are left
    over in a shell, that is half a store with exit code 0 — so say how much of the store is there and why."""
    if not r.distributed:
        return
    st = EmbeddingStore(out)
    have = len(st) + int(st.manifest.get("skipped_count", 0))
    if have < total:
        log.warning("this process is rank %d of %d (from RANK/WORLD_SIZE or SLURM_* in the environment) and embedded "
                    "its share only: the store holds %d of %d images until every rank has run; unset those variables "
                    "to embed everything in one process", r.rank, r.world, have, total)


# --- the seed's layout: one .npy per image (NVIDIA clip-distillation, the first seed) ---


def embed_views(teacher, root: str | Path, plan, out: str | Path, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, max_images: int | None = None) -> EmbeddingStore:
    """Embed every view of a :class:`~clipkd.data.views.ViewPlan` over the images under ``root`` into the store at
    ``out`` (rows keyed ``path#view=k``; the plan saved beside them as ``views.json``). Resumes like
    :func:`embed_images`; a store of another plan (other images, view count, mix or seed) is refused."""
    from ..data.views import ViewPlan

    out = Path(out)
    saved = out / "views.json"
    if saved.is_file():
        old = ViewPlan.load(saved)
        if old.settings() != plan.settings() or old.images != plan.images:
            raise ClipkdError(f"{out} holds the views of another plan ({old.settings()}, {len(old.images)} images; "
                              f"now {plan.settings()}, {len(plan.images)} images); use another folder")
        old.check_files(root, old.images, f"store of views {out}")  # resuming over other files would mix them
    elif (out / "manifest.json").exists():
        raise ClipkdError(f"{out} is a store of plain images, not of views; use another folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        plan.record_sizes(root)
        plan.save(saved)
    return embed_paths(teacher, root, plan.keys(), out, batch_size, workers, progress=progress,
                       max_images=max_images, opener=plan.opener(root))
