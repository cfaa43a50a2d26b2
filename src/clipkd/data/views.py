"""Multi-view stores: K augmented views of each training image, described by their parameters, so that a teacher
embeds every view once and a student trains on them for many epochs (MobileCLIP's reinforced-dataset idea).

A view of image ``a`` is ``a`` (flipped or not), optionally mixed with a partner image ``b`` (flipped or not)
from the same training set: CutMix pastes the box ``(y0, y1, x0, x1)`` (fractions of ``a``'s size) of ``b``
resized to ``a``'s size; mixup blends ``λ·a + (1-λ)·b``; then, optionally, its hues are rotated by ``h`` of a
turn (torchvision's ``adjust_hue``): a red shape becomes a green or blue one, and the teacher says what it is.
The view's key, ``a#view=k``, names its row in the
store; the plan (``views.json`` in the store folder) holds every view's parameters, drawn once from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Sampler
from torchvision.transforms.functional import adjust_hue

from ..errors import ClipkdError
from ..fileio import read_json, write_json
from .images import load_rgb

VIEWS_FORMAT = "clipkd-views/1"
SEP = "#view="
VIEW_MIXES = ("cutmix", "mixup", "none")  # how a view mixes in its partner image
AUTO_HUE = 0.5  # `view_hue`=auto: the share of views (after the first) whose colours are rotated


def count_views(views: Any) -> int:
    """The one reading of ``views`` (the store's ``embed_images`` and ``distill``'s config alike): views per image,
    the image itself first; 0 and 1 both mean the image alone — no views are drawn or stored (``distill`` then
    mixes online, if it mixes) — and are read as 0."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ClipkdError(f"`views` must be an integer ≥ 0 (0 or 1: the image alone, no views), got {views!r}")
    return views if views >= 2 else 0


def resolve_view_hue(view_hue: float | str | None, has_views: bool, needs: str) -> float:
    """The one reading of ``view_hue`` (the store's ``embed_images`` and ``distill``'s config alike): ``auto`` (or
    None) is :data:`AUTO_HUE` where there are views to recolour and 0 where there are none; a number must lie in
    [0, 1], and a nonzero one needs views (``needs`` says which setting gives them)."""
    if view_hue in ("auto", None):
        return AUTO_HUE if has_views else 0.0
    if isinstance(view_hue, (str, bool)) or not isinstance(view_hue, (int, float)) or not 0.0 <= view_hue <= 1.0:
        raise ClipkdError(f"`view_hue` must be in [0, 1], or auto; got {view_hue!r}")
    if view_hue and not has_views:
        raise ClipkdError(f"`view_hue` recolours views: it needs {needs}")
    return float(view_hue)


@dataclass
class ViewPlan:
    """Every view's parameters: ``images[i]`` has views ``0..views-1``; view ``(i, k)`` flips ``a`` when
    ``flip[i][k][0]``, and when ``partner[i][k] >= 0`` mixes in image ``partner[i][k]`` (flipped when
    ``flip[i][k][1]``) by ``box[i][k]`` (cutmix) or ``lam[i][k]`` (mixup); then rotates its hues by ``hue[i][k]``
    (a fraction of a turn in [-0.5, 0.5]; 0 or no ``hue`` list: unchanged)."""

    images: list[str]
    views: int
    mix: str
    alpha: float
    prob: float
    flip: bool
    seed: int
    partner: list[list[int]]
    flips: list[list[list[bool]]]
    box: list[list[list[float]]]
    lam: list[list[float]]
    hue_prob: float = 0.0
    hue: list[list[float]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # byte size of each image when embedded (-1: not a file)
    prints: list[int] = field(default_factory=list)  # content fingerprint of each (-1: unreadable)

    def record_sizes(self, root: str | Path) -> None:
        """Remember each image's byte size and content fingerprint under ``root``, so the store is tied to these
        files (not to names)."""
        import os

        from .tars import content_fingerprint

        def size(p: str) -> int:
            try:
                return os.stat(Path(root) / p).st_size
            except OSError:
                return -1

        self.sizes = [size(p) for p in self.images]
        self.prints = [content_fingerprint(Path(root) / p) for p in self.images]

    def check_files(self, root: str | Path, images: Sequence[str], what: str = "store of views") -> None:
        """Refuse when ``root/images`` are not the files whose views were embedded (compared by byte size, then by
        content fingerprint on up to :data:`~clipkd.data.tars.CHECKED_PRINTS` images spread over them, as a store of
        plain images is): views composed from other pictures would pair with the old targets."""
        import os

        from .tars import changed_files

        if not self.sizes:
            return  # a plan written before sizes were recorded
        pos, bad = self._index(), []
        for p in images:
            want = self.sizes[pos[p]] if p in pos else -1
            if want < 0:
                continue
            try:
                now = os.stat(Path(root) / p).st_size
            except OSError:
                now = -1
            if now != want:
                bad.append(p)
        if bad:
            raise ClipkdError(f"{len(bad)} of the {len(images)} images under {root} are not the files the {what} "
                              f"was embedded from (other sizes), e.g. {bad[:3]}; embed these images into a new store")
        if not self.prints:
            return  # a plan written before fingerprints were recorded: sizes only
        known = [p for p in images if p in pos and self.prints[pos[p]] >= 0]
        bad = changed_files(Path(root), known, [self.prints[pos[p]] for p in known])
        if bad:
            raise ClipkdError(f"{bad[0]} under {root} is not the file the {what} was embedded from (same size, other "
                              "content); embed these images into a new store")

    def keeps_label(self, i: int, k: int) -> bool:
        """Whether view ``(i, k)`` still shows image ``i``'s class: neither mixed nor recoloured (a flip keeps it)."""
        return self.partner[i][k] < 0 and not (self.hue and self.hue[i][k])

    def key(self, i: int, k: int) -> str:
        return f"{self.images[i]}{SEP}{k}"

    def keys(self) -> list[str]:
        """Every view's key, image by image (``views`` consecutive keys per image)."""
        return [self.key(i, k) for i in range(len(self.images)) for k in range(self.views)]

    def settings(self) -> dict[str, Any]:
        return {"views": self.views, "mix": self.mix, "alpha": self.alpha, "prob": self.prob, "flip": self.flip,
                "seed": self.seed, "hue_prob": self.hue_prob}

    def compose(self, root: str | Path, key: str, draft_size: int | None = None) -> Image.Image:
        """The picture of view ``key`` from the image files under ``root``."""
        path, _, k = key.rpartition(SEP)
        i, k = self._index()[path], int(k)
        root = Path(root)
        a = load_rgb(root / path, draft_size)
        fa, fb = self.flips[i][k]
        if fa:
            a = ImageOps.mirror(a)
        j = self.partner[i][k]
        if j >= 0:
            b = load_rgb(root / self.images[j], draft_size)
            if fb:
                b = ImageOps.mirror(b)
            if b.size != a.size:
                b = b.resize(a.size, Image.Resampling.BICUBIC)
            if self.mix == "mixup":
                a = Image.blend(b, a, self.lam[i][k])
            else:
                w, h = a.size
                y0, y1, x0, x1 = self.box[i][k]
                px = (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))
                if px[2] > px[0] and px[3] > px[1]:
                    a.paste(b.crop(px), px[:2])
        if self.hue and self.hue[i][k]:
            a = adjust_hue(a, self.hue[i][k])
        return a

    def opener(self, root: str | Path, draft_size: int | None = None):
        """``key -> PIL image``, for :class:`~clipkd.data.loader.ImageDataset` and the store writer."""
        return _Opener(self, Path(root), draft_size)

    def _index(self) -> dict[str, int]:
        if not hasattr(self, "_pos"):
            self._pos = {p: i for i, p in enumerate(self.images)}
        return self._pos

    def save(self, path: str | Path) -> Path:
        return write_json(path, {"format": VIEWS_FORMAT, **{k: v for k, v in asdict(self).items()}})

    @classmethod
    def load(cls, path: str | Path) -> ViewPlan:
        d = read_json(path, "view plan")
        if d.pop("format", None) != VIEWS_FORMAT:
            raise ClipkdError(f"{path} is not a {VIEWS_FORMAT} view plan")
        return cls(**d)


class _Opener:  # a class, not a closure: DataLoader workers pickle it
    def __init__(self, plan: ViewPlan, root: Path, draft_size: int | None) -> None:
        self.plan, self.root, self.draft_size = plan, root, draft_size

    def __call__(self, key: str) -> Image.Image:
        return self.plan.compose(self.root, key, self.draft_size)


class ViewOrFileOpener:
    """``key → PIL image``: a view key (``path#view=k``) composed by ``plan``, any other key read as a file under
    ``root`` (an absolute key as it is): one loader over captioned images, their stored views and other images."""

    def __init__(self, plan: ViewPlan | None, root: str | Path, draft_size: int | None = None) -> None:
        self.plan, self.root, self.draft_size = plan, Path(root), draft_size

    def __call__(self, key: str) -> Image.Image:
        if self.plan is not None and SEP in key:
            return self.plan.compose(self.root, key, self.draft_size)
        return load_rgb(self.root / key, self.draft_size)


def make_view_plan(images: Sequence[str], views: int, mix: str = "cutmix", alpha: float = 1.0, prob: float = 1.0,
                   flip: bool = True, seed: int = 0, hue_prob: float = 0.0) -> ViewPlan:
    """Draw ``views`` views per image: view 0 is the image itself; each other view flips it with probability 1/2
    (when ``flip``) and, with probability ``prob``, mixes in a random other image of ``images`` (also flipped at
    random) with ``λ ~ Beta(alpha, alpha)``; a CutMix box has area ``1-λ`` and a uniform centre, clipped to the
    image, as timm's per-image CutMix draws it. With probability ``hue_prob`` a view's hues are then rotated by a
    uniform fraction of a turn in [-0.5, 0.5] (drawn after the rest: plans without hue are as before)."""
    if views < 1:
        raise ClipkdError(f"`views` must be ≥ 1, got {views}")
    if mix not in VIEW_MIXES:
        raise ClipkdError(f"unknown mix '{mix}' for views ({', '.join(VIEW_MIXES)})")
    if not 0.0 <= hue_prob <= 1.0:
        raise ClipkdError(f"`view_hue` must be in [0, 1], got {hue_prob}")
    if len(images) < 2 and mix != "none" and views > 1:
        raise ClipkdError("mixed views need at least 2 training images")
    rng = np.random.default_rng(seed)
    n = len(images)
    partner = np.full((n, views), -1, np.int64)
    flips = np.zeros((n, views, 2), bool)
    box = np.zeros((n, views, 4))
    lam = np.ones((n, views))
    if views > 1:
        m = views - 1
        if flip:
            flips[:, 1:] = rng.random((n, m, 2)) < 0.5
        if mix != "none":
            chosen = rng.random((n, m)) < prob
            other = rng.integers(0, n - 1, (n, m))
            other = other + (other >= np.arange(n)[:, None])  # never the image itself
            partner[:, 1:] = np.where(chosen, other, -1)
            lam[:, 1:] = np.where(chosen, rng.beta(alpha, alpha, (n, m)), 1.0)
            cut = np.sqrt(1 - lam[:, 1:])
            cy, cx = rng.random((n, m)), rng.random((n, m))
            box[:, 1:] = np.stack([np.clip(cy - cut / 2, 0, 1), np.clip(cy + cut / 2, 0, 1),
                                   np.clip(cx - cut / 2, 0, 1), np.clip(cx + cut / 2, 0, 1)], -1)
    hue = np.zeros((n, views))
    if views > 1 and hue_prob > 0:
        hue[:, 1:] = np.where(rng.random((n, views - 1)) < hue_prob, rng.uniform(-0.5, 0.5, (n, views - 1)), 0.0)
    return ViewPlan(list(images), views, mix, float(alpha), float(prob), bool(flip), int(seed), partner.tolist(),
                    flips.tolist(), np.round(box, 6).tolist(), np.round(lam, 6).tolist(), float(hue_prob),
                    np.round(hue, 6).tolist() if hue_prob > 0 else [])


class ViewSampler(Sampler[int]):
    """Each epoch, every image once in a shuffled order, each time one of its views at random.

    ``groups[i]``: the dataset indices of image ``i``'s views. Seeded by ``seed`` and the epoch (Lightning calls
    :meth:`set_epoch`), so a resumed run draws what an uninterrupted one would have.
    """

    def __init__(self, groups: Sequence[Sequence[int]], seed: int = 0) -> None:
        self.groups = [list(g) for g in groups if len(g)]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        pick = torch.rand(len(self.groups), generator=g).tolist()
        self.epoch += 1  # without set_epoch, the next pass still differs
        for i in order:
            group = self.groups[i]
            yield group[min(len(group) - 1, math.floor(pick[i] * len(group)))]
