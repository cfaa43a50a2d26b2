"""The per-image ``.npy`` layout of earlier tools (clip-distillation's ``compute_openclip_embeddings.py``), imported
into a store and exported from one."""


from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ..data.folders import list_images
from ..data.tars import content_fingerprint
from ..errors import ClipkdError
from ..fileio import exclusive, write_npy

if TYPE_CHECKING:
    pass
from .reader import EmbeddingStore
from .writer import ShardWriter, file_size, open_for_append

log = logging.getLogger("clipkd.store")


def _npy_name(path: str, flat: bool) -> str:
    return (Path(path).stem if flat else Path(path).with_suffix("").as_posix()) + ".npy"


def import_npy_folder(npy_dir: str | Path, images: str | Path, out: str | Path, teacher: str,
                      preprocess: dict[str, Any] | None = None, shard_size: int = 8192,
                      progress: bool = True) -> EmbeddingStore:
    """Build a store from one ``.npy`` per image: ``npy_dir/<image stem>.npy`` (the seed's flat layout)
    or ``npy_dir/<relative path without extension>.npy``. Rows are L2-normalised. ``teacher``: the spec (or
    clip-train run) of the model that made them, recorded as the identity that model reports when loaded
    (:func:`~clipkd.teachers.factory.teacher_identity`), so that its own online targets and text embeddings match
    the store. Images with no ``.npy`` are counted and listed; unreadable ``.npy`` files are skipped and listed like
    undecodable images."""
    from ..teachers.factory import teacher_identity

    npy_dir, images, out = Path(npy_dir), Path(images), Path(out)
    teacher = teacher_identity(teacher)
    if not npy_dir.is_dir():
        raise ClipkdError(f"embedding folder not found: {npy_dir}")
    files = list_images(images)
    flat = not any((npy_dir / _npy_name(f, False)).is_file() for f in files[:50])
    if flat:
        stems: dict[str, list[str]] = {}
        for f in files:
            stems.setdefault(Path(f).stem, []).append(f)
        dupes = [v for v in stems.values() if len(v) > 1]
        if dupes:
            raise ClipkdError(f"{len(dupes)} image names repeat across folders (e.g. {dupes[0][:2]}), so a flat "
                              f"folder of <name>.npy files in {npy_dir} is ambiguous; use <relative path>.npy")
    have = [f for f in files if (npy_dir / _npy_name(f, flat)).is_file()]
    if not have:
        raise ClipkdError(f"no .npy file in {npy_dir} matches an image under {images} "
                          f"(expected e.g. {npy_dir / _npy_name(files[0], True)})")
    first = np.load(npy_dir / _npy_name(have[0], flat)).reshape(-1)
    info = {"teacher": teacher, "embed_dim": int(first.size), "preprocess": preprocess or {}}
    with exclusive(out, "embedding store"):
        manifest, done = open_for_append(info, images, out, shard_size, have)
        writer = ShardWriter(out, manifest, shard_size, done)
        for f in tqdm([f for f in have if f not in done], desc="import .npy", unit="file", disable=not progress):
            try:
                v = np.load(npy_dir / _npy_name(f, flat)).astype(np.float32).reshape(-1)
                if v.size != info["embed_dim"]:
                    raise ValueError(f"size {v.size}, expected {info['embed_dim']}")
            except (OSError, ValueError) as e:
                writer.skip(f, f"{type(e).__name__}: {e}")
                continue
            writer.add((v / max(float(np.linalg.norm(v)), 1e-12))[None], [f], [file_size(images / f)],
                       [content_fingerprint(images / f)])
        writer.flush(final=True)
    if len(have) < len(files):
        log.warning("%d of %d images have no .npy in %s, e.g. %s", len(files) - len(have), len(files), npy_dir,
                    [f for f in files if f not in set(have)][:3])
    return EmbeddingStore(out)


def export_npy_folder(store: str | Path, out: str | Path, flat: bool = True) -> int:
    """Write each store row as ``out/<image stem>.npy`` (float32; the seed's layout), or with
    ``flat=False`` as ``out/<relative path without extension>.npy``. Returns the number written."""
    st, out = EmbeddingStore(store), Path(out)
    names = [_npy_name(p, flat) for p in st.paths]
    if flat and len(set(names)) < len(names):
        raise ClipkdError(f"store {store} has images with the same file name in different folders; "
                          "export with the mirrored layout (`mirror`)")
    emb = st.embeddings()
    for name, row in zip(names, emb, strict=True):
        write_npy(out / name, np.asarray(row, dtype=np.float32))
    return len(names)
