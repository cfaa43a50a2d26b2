"""Image folders: listing image files and reading ImageFolder class layouts."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ClipkdError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def clean_classname(folder: str) -> str:
    """Turn a folder name into a readable class name: ``red_circle`` → ``red circle``.

    Hyphens stay: they are part of real class names (``T-shirt``, ``yo-yo``, ``go-kart``).
    """
    return re.sub(r"\s+", " ", re.sub(r"_+", " ", folder)).strip()


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise ClipkdError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ClipkdError(f"not a folder: {root}")


def list_images(root: str | Path) -> list[str]:
    """All image files under ``root`` (recursively) as sorted POSIX paths relative to ``root``.

    Files are chosen by extension only; a file that is not really an image is found out (and
    skipped and counted) when it is decoded.
    """
    root = Path(root)
    _require_dir(root)
    files = _walk_images(root)
    if not files:
        raise ClipkdError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def _walk_images(root: Path, prefix: str = "") -> list[str]:
    """Sorted ``prefix + path`` of every image file under ``root``, from directory entries rather than Path objects:
    no stat per file (the entry's type says it is one) and no object per file beyond its name, so a million-image
    folder lists in seconds. Symlinked folders are followed, each folder once (a symlink loop ends)."""
    files: list[str] = []
    st = root.stat()
    todo, seen = [(str(root), prefix)], {(st.st_dev, st.st_ino)}
    while todo:
        folder, pre = todo.pop()
        try:
            entries = os.scandir(folder)
        except OSError as e:  # a folder the listing cannot read would silently drop its images
            raise ClipkdError(f"cannot read folder {folder}: {e.strerror or e}") from None
        with entries:
            for e in entries:
                if e.is_dir():
                    st = e.stat()  # one stat per folder, none per file
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        todo.append((e.path, f"{pre}{e.name}/"))
                elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(pre + e.name)
    files.sort()
    return files


@dataclass(frozen=True)
class LabelledImages:
    """Images with integer labels into ``classnames``; paths are relative to ``root``."""

    root: Path
    paths: list[str]
    labels: list[int]
    classnames: list[str]
    folders: list[str] = field(default_factory=list)  # class folder names (ImageFolder layout), by class

    @property
    def aliases(self) -> dict[str, str]:
        """Folder name → class name, for split files written with folder names."""
        return dict(zip(self.folders, self.classnames, strict=True)) if self.folders else {}

    def subset(self, keep_classes: set[str]) -> LabelledImages:
        """Only the images whose class is in ``keep_classes`` (labels keep indexing ``classnames``)."""
        keep = [i for i, y in enumerate(self.labels) if self.classnames[y] in keep_classes]
        return LabelledImages(self.root, [self.paths[i] for i in keep], [self.labels[i] for i in keep],
                              self.classnames, self.folders)


def scan_image_folder(root: str | Path) -> LabelledImages:
    """Read an ImageFolder layout (``root/<class folder>/<images>``); classes sorted by folder name."""
    root = Path(root)
    _require_dir(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ClipkdError(f"{root} has no class sub-folders (expected ImageFolder layout root/<class>/<image>)")
    classnames = [clean_classname(f) for f in folders]
    dupes = {c for c in classnames if classnames.count(c) > 1}
    if dupes:
        raise ClipkdError(f"class folders in {root} clean to the same name: {sorted(dupes)[:5]}")
    paths, labels = [], []
    for y, folder in enumerate(folders):
        found = _walk_images(root / folder, f"{folder}/")
        paths += found
        labels += [y] * len(found)
    if not paths:
        raise ClipkdError(f"no image files found in the class folders of {root}")
    return LabelledImages(root, paths, labels, classnames, folders)


def labels_from_paths(paths: Sequence[str]) -> tuple[list[int], list[str]] | None:
    """Labels from the first folder of each relative path (class or product-id folders), if every path has one."""
    first = [Path(p).parts[0] if len(Path(p).parts) > 1 else None for p in paths]
    if any(f is None for f in first):
        return None
    names = sorted(set(first))
    pos = {n: i for i, n in enumerate(names)}
    return [pos[f] for f in first], names
