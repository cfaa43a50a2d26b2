"""WebDataset tar shards as an image source: ``--images 'shards/{00000..00099}.tar'`` (img2dataset's output).

A sample is the tar members sharing a key (``dir/000123.jpg``, ``000123.txt``, ``000123.json``, ``000123.cls``:
WebDataset's convention, key = member name up to the first dot of its base name). clipkd names a sample
``<shard file name>/<key>``, a path relative to the shards' folder, so every command that reads images by path
(stores, training, evaluation, views, the search index) reads samples too: :func:`read_member` serves the
image bytes of ``.../shard.tar/key`` by seeking to the member (each process indexes a shard's headers once).

Reading is random access rather than a stream: the data set keeps its order, so training shuffles globally,
resumes mid-run, and Lightning's distributed sampler gives each rank its share; embedding splits the samples
between ranks by shard, so each rank reads its own shards. Tars must be plain (uncompressed) and seekable:
local or network file systems, not ``pipe:``/``http`` URLs (download them first, e.g. ``clipkd download``).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClipkdError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
CAPTION_EXTS = ("txt", "caption")
_INDEX: dict[str, dict[str, tuple[int, int]]] = {}  # shard path → key → (offset, size) of its image, per process
_SHARDS: set[str] = set()  # shard paths already seen to be files, per process


def is_tar_source(images: str | Path) -> bool:
    """Whether ``images`` names WebDataset shards (a ``.tar`` file or a brace pattern of them)."""
    s = str(images)
    return s.endswith(".tar") or (".tar" in s and "{" in s)


def expand_shards(pattern: str | Path) -> list[Path]:
    """The shard files of a path or brace pattern (``a/{000..009}.tar``), each checked to exist."""
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        shards = [Path(p) for p in braceexpand(str(pattern))]
    except UnbalancedBracesError:
        raise ClipkdError(f"shard pattern {pattern}: unbalanced braces (e.g. 'shards/{{00000..00099}}.tar')") from None
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise ClipkdError(f"{len(missing)} of the {len(shards)} tar shard(s) of {pattern} not found, e.g. "
                          f"{missing[:3]}")
    return shards


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split of a member name."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


@dataclass
class TarSamples:
    """The samples of a set of shards: ``keys`` (``<shard name>/<key>``, relative to ``root``), with a caption
    list and a label where the shards carry them. ``damaged``: shards whose end could not be read (their samples
    up to the damage are kept)."""

    root: Path
    keys: list[str] = field(default_factory=list)
    captions: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)

    def shard_of(self, key: str) -> str:
        return key.split("/", 1)[0]


def read_shards(pattern: str | Path) -> TarSamples:
    """Scan the shards of ``pattern``: every sample with an image member, its ``.txt`` captions (one per line) and
    its label (``.cls``: an integer or a class name; or ``.json``: ``label`` or ``class``). A shard cut short keeps
    the samples before the cut (logged, listed in ``damaged``)."""
    shards = expand_shards(pattern)
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in shards]))
    names = [p.resolve().relative_to(root).as_posix() for p in shards]
    if len(set(names)) < len(names):
        raise ClipkdError(f"shards of {pattern} repeat a file name")
    out = TarSamples(root)
    for shard, name in zip(shards, names, strict=True):
        index, extras = _scan(shard.resolve(), out)
        for key in index:
            out.keys.append(f"{name}/{key}")
        for key, (caps, label) in extras.items():
            if key in index:
                if caps:
                    out.captions[f"{name}/{key}"] = caps
                if label is not None:
                    out.labels[f"{name}/{key}"] = label
    if out.damaged:
        import logging

        logging.getLogger(__name__).warning("%d shard(s) end early or are damaged; their samples before the damage "
                                            "are used: %s", len(out.damaged), out.damaged[:3])
    if not out.keys:
        raise ClipkdError(f"no image member ({', '.join(IMAGE_EXTS)}) in the shards of {pattern}")
    return out


def _scan(shard: Path, out: TarSamples | None = None) -> tuple[dict[str, tuple[int, int]], dict[str, tuple]]:
    """Index one shard's image members (cached per process) and read its small members (captions, labels)."""
    index: dict[str, tuple[int, int]] = {}
    extras: dict[str, tuple[list[str], Any]] = {}
    end, cut = shard.stat().st_size, False
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > end:  # a shard cut short (a copy or download that stopped)
                    cut = True
                    break
                key, ext = _split(m.name)
                if ext in IMAGE_EXTS:
                    index[key] = (m.offset_data, m.size)
                elif out is not None and ext in (*CAPTION_EXTS, "cls", "json"):
                    data = tar.extractfile(m).read().decode("utf-8", "replace")
                    caps, label = extras.get(key, ([], None))
                    if ext in CAPTION_EXTS:
                        caps = caps + [line.strip() for line in data.splitlines() if line.strip()]
                    elif ext == "cls":
                        label = int(data.strip()) if data.strip().lstrip("-").isdigit() else data.strip()
                    else:
                        try:
                            meta = json.loads(data)
                        except json.JSONDecodeError:
                            meta = {}
                        if isinstance(meta, dict):
                            label = meta.get("label", meta.get("class", label))
                            if isinstance(meta.get("caption"), str) and not caps:
                                caps = [meta["caption"]]
                    extras[key] = (caps, label)
            if not cut:  # a whole tar ends with an end-of-archive block of zeros; a cut one stops before it
                tar.fileobj.seek(tar.offset)
                tail = tar.fileobj.read(512)
                cut = len(tail) < 512 or bool(tail.strip(b"\0"))
    except tarfile.ReadError as e:
        if not index and out is None:
            raise ClipkdError(f"{shard} is not a readable tar file: {e}") from None
        if out is not None:
            out.damaged.append(str(shard))
    except OSError as e:
        raise ClipkdError(f"cannot read shard {shard}: {e}") from None
    if cut and out is not None:
        out.damaged.append(str(shard))
    _INDEX[str(shard)] = index
    return index, extras


def tar_member_path(path: str | Path) -> tuple[Path, str] | None:
    """``(shard, key)`` when ``path`` names a sample inside a tar shard (``.../x.tar/key``), else None."""
    s = str(path)
    at = s.find(".tar/")
    while at >= 0:
        prefix = s[: at + 4]
        if prefix in _SHARDS or Path(prefix).is_file():  # a stat once per shard and process, not per sample
            _SHARDS.add(prefix)
            return Path(prefix), s[at + 5:]
        at = s.find(".tar/", at + 1)
    return None


def read_member(shard: Path, key: str) -> bytes:
    """The image bytes of sample ``key`` of ``shard`` (a missing sample raises ``FileNotFoundError``)."""
    index = _INDEX.get(str(shard))  # sample paths are built from the resolved shard root: found without a syscall
    if index is None:
        shard = shard.resolve()
        index = _INDEX.get(str(shard)) or _scan(shard)[0]
        _INDEX[str(shard)] = index
    if key not in index:
        raise FileNotFoundError(f"no image for sample '{key}' in {shard}")
    offset, size = index[key]
    with shard.open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard} ends inside sample '{key}'")
    return data


def labelled_shards(pattern: str | Path):
    """The labelled samples of ``pattern`` as :class:`~clipkd.data.folders.LabelledImages`: class names from
    string labels, or for integer labels from ``classnames.txt`` (one per line) beside the shards when there is
    one. Samples without a label are left out and counted; shards with no label at all are an error."""
    import logging

    from .folders import LabelledImages

    samples = read_shards(pattern)
    if not samples.labels:
        raise ClipkdError(f"the samples of {pattern} carry no label (.cls member, or 'label'/'class' in .json)")
    keys = [k for k in samples.keys if k in samples.labels]
    if len(keys) < len(samples.keys):
        logging.getLogger(__name__).warning("%d of %d samples of %s have no label; left out",
                                            len(samples.keys) - len(keys), len(samples.keys), pattern)
    raw = [samples.labels[k] for k in keys]
    names_file = samples.root / "classnames.txt"
    if all(isinstance(v, int) for v in raw) and names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        bad = sorted({v for v in raw if not 0 <= v < len(names)})
        if bad:
            raise ClipkdError(f"labels {bad[:5]} of {pattern} are outside the {len(names)} names of {names_file}")
        return LabelledImages(samples.root, keys, list(raw), names)
    classnames = sorted({str(v) for v in raw})
    pos = {c: i for i, c in enumerate(classnames)}
    return LabelledImages(samples.root, keys, [pos[str(v)] for v in raw], classnames)


CHECKED_PRINTS = 256  # rows whose content fingerprint is compared when a store is used for a folder of images


def changed_files(root: Path, paths: list[str], prints: list[int],
                  fingerprint: Callable[[str], int] | None = None) -> list[str]:
    """Of up to :data:`CHECKED_PRINTS` of ``paths`` spread over them, those whose content fingerprint under ``root``
    (``fingerprint(path)`` for keys that are not files: a TSV row's) is not the recorded one in ``prints`` (a
    negative print: not recorded, not compared)."""
    step = max(1, len(paths) // CHECKED_PRINTS)
    now = fingerprint or (lambda p: content_fingerprint(Path(root) / p))
    return [p for p, want in zip(paths[::step], prints[::step], strict=True) if want >= 0 and now(p) != want]


def content_fingerprint(path: Path) -> int:
    """A cheap content fingerprint of an image file, or of a WebDataset sample (``shard.tar/key``): its first and
    last 4 KiB and its size, hashed (-1: unreadable). Costs one small read per image, just read by the loader."""
    from ..fileio import data_fingerprint, file_fingerprint

    try:
        member = tar_member_path(path)
        return data_fingerprint(read_member(*member)) if member is not None else file_fingerprint(path)
    except OSError:
        return -1
