"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented UTF-8 JSON."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False), mode="w")


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """Atomically write one ``.npy`` array."""
    return atomic_write(path, lambda f: np.save(f, array))


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Atomically write an uncompressed ``.npz`` archive."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def write_torch(path: str | Path, obj: Any) -> Path:
    """Atomically ``torch.save`` an object."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON, raising a one-line :class:`ClipkdError` on a missing or malformed file."""
    from .errors import ClipkdError

    path = Path(path)
    if not path.is_file():
        raise ClipkdError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipkdError(f"{what} {path} is not valid JSON: {e}") from None
