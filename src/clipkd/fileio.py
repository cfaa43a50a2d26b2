"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def file_mode() -> int:
    """The mode a plainly created file gets under this process's umask (``tempfile.mkstemp`` makes 0600 files, so
    an atomic write sets this instead: a serving user or group reads what the umask lets it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def bytes_fingerprint(head: bytes, tail: bytes, size: int) -> int:
    """The fingerprint of content with this first and last window and this size (non-negative: -1 and -2 stay
    markers). The one fingerprint scheme: images, samples, TSV rows and model files alike."""
    h = hashlib.blake2b(head + tail + str(size).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


def data_fingerprint(data: bytes, window: int = 4096) -> int:
    """:func:`bytes_fingerprint` of content held in memory (a tar member, a TSV row's image)."""
    return bytes_fingerprint(data[:window], data[-window:] if len(data) > 2 * window else data[window:], len(data))


def file_fingerprint(path: str | Path, window: int = 4096) -> int:
    """A cheap content fingerprint of a file of any size: its first and last ``window`` bytes and its size, hashed
    (what :func:`data_fingerprint` gives for the same bytes); one small read per image."""
    with open(path, "rb") as f:
        head = f.read(window)
        size = os.fstat(f.fileno()).st_size
        if size > 2 * window:
            f.seek(size - window)
        return bytes_fingerprint(head, f.read(window), size)


def weights_fingerprint(path: str | Path) -> str:
    """A model file's fingerprint for its identity string: :func:`file_fingerprint` over 1 MiB windows, in hex."""
    return f"{file_fingerprint(path, 1 << 20):016x}"


def relative(path: str | Path, base: str | Path) -> str:
    """``path`` relative to ``base`` (both resolved), in POSIX form, climbing with ``../`` where it lies outside:
    how clipkd records a location so that what it wrote moves with what it names."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def ref(x: Any) -> Any:
    """What a step returned, as the next step takes it: a training result → the spec that loads it (a CLIP) or its
    run folder (a student); a store → its folder; a path or spec as it is. The API chains through this."""
    if x is None or isinstance(x, (str, Path)):
        return x
    spec = getattr(x, "spec", None)
    if isinstance(spec, str) and spec:
        return spec
    for name in ("out", "root"):
        value = getattr(x, name, None)
        if isinstance(value, (str, Path)):
            return value
    return x


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it over ``path`` (with the umask's mode).
    A failed write (a full disk: ENOSPC, or numpy's short write that names no errno) leaves nothing behind and is
    one line naming ``path`` — the output, not the temporary file — and the space left on its disk."""
    import shutil

    from .errors import ClipkdError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, file_mode())
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        free = shutil.disk_usage(path.parent).free
        why = e.strerror or str(e).strip() or type(e).__name__
        raise ClipkdError(f"cannot write {path}: {why} ({free / 2**20:,.1f} MiB free on its disk"
                          f"{'; the disk is full' if free < 2**20 or e.errno == 28 else ''})") from None
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


def check_torch_file(path: str | Path, what: str, fix: str = "") -> None:
    """A one-line error for a damaged PyTorch file (``torch.save``'s zip format: a truncated one has lost its
    central directory; one damaged mid-way fails a member's CRC, which ``torch.load`` never checks and so would
    load wrong weights). Another format (a legacy pickle, safetensors) is left to its reader."""
    import zipfile

    from .errors import ClipkdError

    path = Path(path)
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return  # not a zip at all: not torch.save's format, the reader says what it is
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        bad = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    else:
        bad = None if bad is None else f"member {bad} fails its CRC check"
    if bad is not None:
        raise ClipkdError(f"{what} {path} is damaged ({bad}){'; ' + fix if fix else ''}")


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


LOCK_NAME = ".clipkd.lock"


def check_can_create(path: str | Path, what: str = "output folder") -> Path:
    """A one-line error, before any work and without creating anything, when ``path`` could not become a folder:
    it is a file, or the nearest folder that exists above it is not writable."""
    from .errors import ClipkdError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ClipkdError(f"{what} {path} exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ClipkdError(f"cannot create {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipkdError(f"{what} {path} is not writable" if parent == path else
                          f"cannot create {what} {path}: {parent} is not writable")
    return path


def check_out_file(path: str | Path, what: str = "output file") -> Path:
    """A one-line error, before any work, when a file could not be written at ``path``: it is a folder, or its
    folder could not be created (a file in the way, no permission)."""
    from .errors import ClipkdError

    path = Path(path)
    if path.is_dir():
        raise ClipkdError(f"{what} {path} is a folder; give a file name")
    check_can_create(path.parent, f"the folder of {what} {path}:")
    return path


def check_out_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` as a folder, or raise a one-line error if it is a file or cannot be written."""
    from .errors import ClipkdError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ClipkdError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipkdError(f"cannot create {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ClipkdError(f"{what} {path} is not writable")
    return path


@contextmanager
def exclusive(path: str | Path, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on the folder ``path`` (created) while the block runs.

    A second process asking for the same folder gets a one-line error at once instead of interleaving its
    writes with ours. The lock (``flock`` on ``.clipkd.lock``, via ``filelock``) dies with its process, so a
    killed job never leaves a folder locked.
    """
    from filelock import FileLock, Timeout

    from .errors import ClipkdError

    path = check_out_dir(path, what)
    lock = FileLock(path / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ClipkdError(f"{what} {path} is in use by another clipkd process; wait for it to finish or use "
                          "another folder") from None
    try:
        yield path
    finally:
        lock.release()
