"""The embedding store: a teacher's image embeddings, computed once, in resumable fp16 shards.

Layout of a store folder::

    manifest.json          teacher identity, embed size, preprocessing, counts, shards, skipped files
    shard-00000.npy        (n, D) float16, L2-normalised rows
    shard-00000.txt        the n image paths (relative to the image root), one per line

A shard is written (atomically) before the manifest names it, so a killed run loses at most the
shard it was filling; re-running the same command embeds only images no finished shard holds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .data.folders import list_images
from .data.loader import ImageDataset, make_loader
from .errors import ClipkdError
from .fileio import read_json, write_json, write_npy, write_text

STORE_FORMAT = "clipkd-store/1"


class EmbeddingStore:
    """Read access to a store folder written by :func:`embed_images`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise ClipkdError(f"not an embedding store (no manifest.json): {self.root}")
        self.manifest: dict[str, Any] = read_json(manifest, "store manifest")
        if self.manifest.get("format") != STORE_FORMAT:
            raise ClipkdError(f"{manifest} is not a {STORE_FORMAT} manifest")
        self._paths: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._emb: np.ndarray | None = None

    @property
    def teacher(self) -> str:
        return self.manifest["teacher"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def paths(self) -> list[str]:
        """Relative image paths, in row order."""
        if self._paths is None:
            paths: list[str] = []
            for shard in self.manifest["shards"]:
                lines = (self.root / shard["paths"]).read_text(encoding="utf-8").splitlines()
                if len(lines) != shard["count"]:
                    raise ClipkdError(f"store {self.root}: {shard['paths']} lists {len(lines)} paths, "
                                      f"manifest says {shard['count']}")
                paths.extend(lines)
            self._paths = paths
        return self._paths

    def embeddings(self) -> np.ndarray:
        """All rows as one (N, D) float16 array."""
        if self._emb is None:
            parts = []
            for shard in self.manifest["shards"]:
                try:
                    arr = np.load(self.root / shard["file"], mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise ClipkdError(f"store {self.root}: cannot read {shard['file']}: {e}") from None
                if arr.shape != (shard["count"], self.embed_dim):
                    raise ClipkdError(f"store {self.root}: {shard['file']} has shape {arr.shape}, "
                                      f"expected ({shard['count']}, {self.embed_dim})")
                parts.append(arr)
            self._emb = np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float16)
        return self._emb

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Row numbers of ``paths``; -1 where the store has no embedding for a path."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths)}
        return np.array([self._index.get(p, -1) for p in paths], dtype=np.int64)

    def check_teacher(self, identity: str) -> None:
        """Refuse to mix embeddings of two teachers."""
        if identity != self.teacher:
            raise ClipkdError(f"store {self.root} holds embeddings of teacher '{self.teacher}', "
                              f"not '{identity}'; use another --out folder")


def _new_manifest(teacher, images_root: Path, shard_size: int) -> dict[str, Any]:
    info = teacher.describe()
    return {"format": STORE_FORMAT, "teacher": info["teacher"], "embed_dim": info["embed_dim"],
            "preprocess": info["preprocess"], "normalized": "l2", "dtype": "float16",
            "images_root": str(images_root.resolve()), "shard_size": shard_size, "count": 0,
            "skipped_count": 0, "skipped": [], "shards": [], "seconds": 0.0}


def embed_images(
    teacher,
    images: str | Path,
    out: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    shard_size: int = 8192,
    progress: bool = True,
    max_images: int | None = None,
) -> EmbeddingStore:
    """Embed every image under ``images`` with ``teacher`` into the store at ``out`` (resuming).

    Images already in a finished shard (or recorded as skipped) are not recomputed; files that
    cannot be decoded are skipped and listed in the manifest. ``max_images`` stops after that
    many new images (used to test resumption).
    """
    images, out = Path(images), Path(out)
    files = list_images(images)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        store = EmbeddingStore(out)
        store.check_teacher(teacher.identity)
        manifest = store.manifest
        done = set(store.paths) | {s["path"] for s in manifest["skipped"]}
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest, done = _new_manifest(teacher, images, shard_size), set()
    pending = [f for f in files if f not in done]
    if max_images is not None:
        pending = pending[:max_images]
    if not pending:
        return EmbeddingStore(out)

    draft = max(manifest["preprocess"].get("size") or [0]) or None
    loader = make_loader(ImageDataset(images, pending, teacher.preprocess, draft_size=draft),
                         batch_size=batch_size, workers=workers)
    buf_emb: list[np.ndarray] = []
    buf_paths: list[str] = []
    buf_skipped: list[dict[str, str]] = []
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal t0
        n = len(manifest["shards"])
        name = f"shard-{n:05d}"
        emb = np.concatenate(buf_emb) if buf_emb else np.zeros((0, manifest["embed_dim"]), np.float16)
        write_text(out / f"{name}.txt", "".join(p + "\n" for p in buf_paths))
        write_npy(out / f"{name}.npy", emb)
        manifest["shards"].append({"file": f"{name}.npy", "paths": f"{name}.txt", "count": len(buf_paths)})
        manifest["count"] += len(buf_paths)
        manifest["skipped"].extend(buf_skipped)
        manifest["skipped_count"] = len(manifest["skipped"])
        now = time.perf_counter()
        manifest["seconds"] = round(manifest["seconds"] + now - t0, 3)
        t0 = now
        write_json(manifest_path, manifest)
        buf_emb.clear(), buf_paths.clear(), buf_skipped.clear()

    bar = tqdm(total=len(pending), desc="embed-images", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in loader:
            for idx, err in batch["skipped"]:
                buf_skipped.append({"path": pending[idx], "error": err})
            if batch["image"] is not None:
                emb = teacher.encode_image(batch["image"]).cpu().numpy().astype(np.float16)
                buf_emb.append(emb)
                buf_paths.extend(pending[i] for i in batch["index"].tolist())
            step = len(batch["index"]) + len(batch["skipped"])
            bar.update(step)
            bar.set_postfix(skipped=manifest["skipped_count"] + len(buf_skipped))
            if len(buf_paths) + len(buf_skipped) >= shard_size:
                flush()
    if buf_paths or buf_skipped:
        flush()
    bar.close()
    return EmbeddingStore(out)
