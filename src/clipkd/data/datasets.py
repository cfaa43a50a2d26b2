"""Real datasets: image lists (CSV/TSV), ImageNet WordNet-id folders, the xlsa17 GZSL benchmarks
(AwA2, CUB, SUN, aPY "proposed splits"), and CoOp's base-to-new split.

Everything becomes a :class:`LabelledImages` (what training and evaluation read) and, for GZSL, a
:class:`Split`; ``clipkd dataset xlsa17`` writes them as ``path,label`` lists and ``split.json``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ClipkdError
from ..fileio import write_text
from .folders import LabelledImages, clean_classname, scan_image_folder
from .splits import Split, write_split

log = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")


def imagenet_classnames(wnids: Sequence[str]) -> list[str] | None:
    """Readable names for ImageNet WordNet ids (open_clip's ``IMAGENET_CLASSNAMES``, which follow the
    sorted order of the 1000 ILSVRC wnids, as timm's ``ImageNetInfo`` lists them); None if not all are."""
    if not wnids or not all(WNID.match(w) for w in wnids):
        return None
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        return None
    return [IMAGENET_CLASSNAMES[index[w]] for w in wnids]


def read_path_list(path: str | Path, root: str | Path | None = None,
                   max_missing: float = 0.01) -> tuple[Path, list[str], list[str] | None]:
    """An image list: ``(root, paths, labels)``. A CSV (TSV when the file ends in ``.tsv``) whose header has a
    ``path`` column (and a ``label`` column for labels), or a plain list with no header, one path a line (an
    unlabelled pool: ``labels`` is None).

    Paths are relative to ``root`` (default: the list's folder) or absolute. Listed files missing under ``root``
    are left out with a note when they are at most ``max_missing`` of the list; more than that means a wrong
    root: an error with the count and the first few.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipkdError(f"image list not found: {path}")
    root = Path(root) if root is not None else path.parent
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline().strip()
        f.seek(0)
        named = [c.strip().lower() for c in first.split(delimiter)]
        plain = (root / first).is_file() or ("path" not in named and delimiter not in first)  # one path a line
        if not plain and "path" not in named:
            raise ClipkdError(f"image list {path} needs a header with a 'path' column (and 'label' for labelled "
                              f"images), or one path a line; found {first.split(delimiter)}")
        if not plain:
            reader = csv.DictReader(f, delimiter=delimiter)
            labelled = "label" in (reader.fieldnames or [])
            rows = [(r["path"], r["label"] if labelled else None) for r in reader
                    if r["path"] and (not labelled or r["label"])]
        else:  # no header: one path a line
            rows = [(line.strip(), None) for line in f.read().splitlines() if line.strip()]
            labelled = False
    if not rows:
        raise ClipkdError(f"image list {path} has no rows")
    missing = [p for p, _ in rows if not (root / p).is_file()]
    if missing:
        if len(missing) > max_missing * len(rows):
            raise ClipkdError(f"{len(missing)} of the {len(rows)} images listed in {path} are not under {root}, "
                              f"e.g. {missing[:3]} (wrong image root?)")
        log.warning("%d of %d listed images are missing under %s; left out, e.g. %s", len(missing), len(rows), root,
                    missing[:3])
        gone = set(missing)
        rows = [r for r in rows if r[0] not in gone]
    return root, [p for p, _ in rows], [lab for _, lab in rows] if labelled else None


def read_list_columns(path: str | Path) -> dict[str, dict[str, str]]:
    """The columns of an image list other than ``path`` and ``label`` (brand, price band...): ``column → {path as
    listed → value}``; none for a plain list."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline()
        if "path" not in [c.strip().lower() for c in first.strip().split(delimiter)]:
            return {}
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)
        extra = [c for c in reader.fieldnames or [] if c not in ("path", "label") and c]
        out: dict[str, dict[str, str]] = {c: {} for c in extra}
        for r in reader:
            for c in extra:
                if r.get("path") and r.get(c) not in (None, ""):
                    out[c][r["path"]] = r[c]
    return out


def read_image_list(path: str | Path, root: str | Path | None = None, max_missing: float = 0.01) -> LabelledImages:
    """A labelled ``path,label`` list (see :func:`read_path_list`); labels are class names (classes sorted)."""
    root, paths, labels = read_path_list(path, root, max_missing)
    if labels is None:
        raise ClipkdError(f"image list {path} has no 'label' column: labelled images need a header with columns "
                          "'path' and 'label'")
    classnames = sorted(set(labels))
    pos = {c: i for i, c in enumerate(classnames)}
    return LabelledImages(root, paths, [pos[c] for c in labels], classnames)


def write_image_list(path: str | Path, data: LabelledImages, indices: Sequence[int] | None = None) -> Path:
    """Write (a subset of) ``data`` as a ``path,label`` CSV, paths relative to ``data.root``."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"])
    for i in indices if indices is not None else range(len(data.paths)):
        w.writerow([data.paths[i], data.classnames[data.labels[i]]])
    return write_text(path, buf.getvalue())


def load_labelled(images: str | Path, root: str | Path | None = None) -> LabelledImages:
    """Labelled images from an ImageFolder (ImageNet wnid folders get readable names), a list file, or WebDataset
    shards whose samples carry a label (:func:`~clipkd.data.tars.labelled_shards`)."""
    from .tars import is_tar_source, labelled_shards

    if is_tar_source(images):
        return labelled_shards(images)
    images = Path(images)
    if images.is_file():
        return read_image_list(images, root)
    data = scan_image_folder(images)
    folders = sorted({PurePosixPath(p).parts[0] for p in data.paths})
    names = imagenet_classnames(folders)
    if names is not None and len(folders) == len(data.classnames):
        return LabelledImages(data.root, data.paths, data.labels, names)
    return data


def seen_images(images: str | Path, split: str | Path | None) -> tuple[LabelledImages, list[str]]:
    """The labelled images of ``images`` whose class the ``split`` file marks seen (all of them without a split),
    and the seen class names."""
    from .splits import load_split

    data = load_labelled(images)
    if split is None:
        return data, list(data.classnames)
    seen = list(load_split(split, data.classnames, data.aliases, seen_only=True).seen)
    return data.subset(set(seen)), seen


def coop_base_to_new(classnames: Sequence[str]) -> Split:
    """CoOp's base-to-new split: classes in sorted label order, the first ceil(n/2) are base (seen)."""
    ordered = list(classnames)
    n_base = math.ceil(len(ordered) / 2)
    return Split(seen=ordered[:n_base], unseen=ordered[n_base:])


# --- xlsa17 (Xian et al., "Zero-Shot Learning — the Good, the Bad and the Ugly", proposed splits) ---

XLSA_SPLIT_FIELDS = ("allclasses_names", "trainval_loc", "test_seen_loc", "test_unseen_loc")
XLSA_RES_FIELDS = ("image_files", "labels")


def _loadmat(path: Path, fields: Sequence[str]) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise ClipkdError(f"xlsa17 file not found: {path}")
    try:
        mat = loadmat(path)
    except Exception as e:  # noqa: BLE001 - any unreadable .mat is the same user error
        raise ClipkdError(f"cannot read {path} as a MATLAB file: {type(e).__name__}: {e}") from None
    missing = [f for f in fields if f not in mat]
    if missing:
        raise ClipkdError(f"{path} lacks field(s) {missing} (an xlsa17 file has {list(fields)})")
    return mat


def _strings(cell) -> list[str]:
    """MATLAB cell array of strings → list of str."""
    return [str(np.asarray(x).ravel()[0]) if np.asarray(x).size else "" for x in np.asarray(cell).ravel()]


def xlsa_classname(raw: str) -> str:
    """``001.Black_footed_Albatross`` → ``black footed albatross``; ``antelope`` → ``antelope``."""
    return clean_classname(re.sub(r"^\d+\.", "", raw)).lower()


def reroot(paths: Sequence[str], image_root: Path) -> tuple[list[str], int]:
    """Map the authors' absolute paths onto ``image_root``: find how many leading components to drop
    (the fewest that make the files exist), apply that to all. Returns the relative paths and the count dropped."""
    sample = [PurePosixPath(p) for p in paths[:: max(1, len(paths) // 50)][:50]]
    depth = max(len(p.parts) for p in sample)
    best, best_hits = None, 0
    for drop in range(depth):
        hits = sum((image_root / PurePosixPath(*p.parts[drop:])).is_file() for p in sample if len(p.parts) > drop)
        if hits > best_hits:
            best, best_hits = drop, hits
    if best is None:
        raise ClipkdError(f"none of the xlsa17 image files (e.g. {paths[0]}) are under {image_root}, whichever "
                          "leading folders are dropped; pass the folder that holds the dataset's images")
    return [PurePosixPath(*PurePosixPath(p).parts[best:]).as_posix() for p in paths], best


def read_xlsa17(split_dir: str | Path, image_root: str | Path) -> tuple[LabelledImages, Split, dict[str, list[int]]]:
    """Read ``att_splits.mat`` and ``res101.mat`` of one xlsa17 dataset.

    Returns all images (re-rooted onto ``image_root``, readable class names), the seen/unseen split
    (seen = classes of ``trainval``, unseen = classes of ``test_unseen``) and the image indices of
    ``trainval``, ``test_seen`` and ``test_unseen`` (0-based; the files' locations are 1-based).
    Listed files missing under the root are an error naming how many and the first few.
    """
    split_dir, image_root = Path(split_dir), Path(image_root)
    att = _loadmat(split_dir / "att_splits.mat", XLSA_SPLIT_FIELDS)
    res = _loadmat(split_dir / "res101.mat", XLSA_RES_FIELDS)
    if not image_root.is_dir():
        raise ClipkdError(f"image folder not found: {image_root}")
    names = [xlsa_classname(c) for c in _strings(att["allclasses_names"])]
    files = _strings(res["image_files"])
    labels = np.asarray(res["labels"]).ravel().astype(int) - 1
    if len(files) != len(labels):
        raise ClipkdError(f"{split_dir / 'res101.mat'}: {len(files)} image_files but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(names):
        raise ClipkdError(f"{split_dir / 'res101.mat'}: labels outside 1..{len(names)} (allclasses_names)")
    parts = {}
    for key in ("trainval", "test_seen", "test_unseen"):
        loc = np.asarray(att[f"{key}_loc"]).ravel().astype(int) - 1
        if loc.size and (loc.min() < 0 or loc.max() >= len(files)):
            raise ClipkdError(f"{split_dir / 'att_splits.mat'}: {key}_loc points outside the {len(files)} images")
        parts[key] = loc.tolist()
    rel, _ = reroot(files, image_root)
    missing = [p for p in rel if not (image_root / p).is_file()]
    if missing:
        raise ClipkdError(f"{len(missing)} of the {len(rel)} xlsa17 images are not under {image_root}, "
                          f"e.g. {missing[:3]}")
    seen_ids = sorted({int(labels[i]) for i in parts["trainval"]})
    unseen_ids = sorted({int(labels[i]) for i in parts["test_unseen"]})
    data = LabelledImages(image_root, rel, labels.tolist(), names)
    return data, Split([names[i] for i in seen_ids], [names[i] for i in unseen_ids]), parts


def write_xlsa17(split_dir: str | Path, image_root: str | Path, out: str | Path) -> dict[str, int]:
    """Write an xlsa17 dataset as clipkd inputs: ``trainval.csv``, ``test_seen.csv``, ``test_unseen.csv``,
    ``test.csv`` (both test parts), ``split.json`` and ``classes.txt``. List paths are absolute, so the
    lists work from anywhere as ``--images``. Returns the number of images in each list."""
    from .splits import write_split

    data, split, parts = read_xlsa17(split_dir, image_root)
    out = Path(out)
    absolute = LabelledImages(data.root, [str((data.root / p).resolve()) for p in data.paths], data.labels,
                              data.classnames)
    parts["test"] = parts["test_seen"] + parts["test_unseen"]
    for name, idx in parts.items():
        write_image_list(out / f"{name}.csv", absolute, idx)
    write_split(out / "split.json", split)
    write_text(out / "classes.txt", "".join(c + "\n" for c in data.classnames))
    return {name: len(idx) for name, idx in parts.items()}


def write_coop_split(images: str | Path, out: str | Path) -> Split:
    """CoOp's base-to-new split of the classes of ``images`` (folder, list or class-name file) → ``out`` (JSON)."""
    split = coop_base_to_new(load_classnames(images))
    write_split(out, split)
    return split


def load_classnames(source: str | Path) -> list[str]:
    """Class names from an ImageFolder (sub-folder names cleaned; ImageNet wnids → readable names),
    a ``path,label`` image list (``.csv``/``.tsv``), or a text file (one name per line)."""
    source = Path(source)
    if source.is_dir() or source.suffix.lower() in (".csv", ".tsv"):
        return load_labelled(source).classnames
    if source.is_file():
        names = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not names:
            raise ClipkdError(f"class-name file {source} is empty")
        return names
    raise ClipkdError(f"class names: no such folder or file: {source}")
