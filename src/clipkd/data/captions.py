"""Image–caption pairs: a ``path,caption`` CSV over an image folder, or Chinese-CLIP's TSV + JSONL format.

Chinese-CLIP format (``{split}_imgs.tsv`` and ``{split}_texts.jsonl``): each TSV line is
``image_id<TAB>base64-encoded image``; each JSONL line ``{"text_id": .., "text": .., "image_ids": [..]}``.
Images are read from the TSV by byte offset (an index built in one pass), so a multi-GB file is
never held in memory; a broken base64 image is skipped and counted like a corrupt file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ClipkdError
from .images import TsvImages
from .loader import ImageDataset


def read_captions(csv_path: str | Path, images_root: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """``{relative path: [captions]}`` for the rows whose image exists, and the missing paths.

    A file without ``path`` and ``caption`` columns, or whose images are all missing, is an error.
    """
    csv_path, images_root = Path(csv_path), Path(images_root)
    if not csv_path.is_file():
        raise ClipkdError(f"caption file not found: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ClipkdError(f"caption file {csv_path} needs a header with columns 'path' and 'caption', "
                              f"found {reader.fieldnames}")
        pairs: dict[str, list[str]] = {}
        for row in reader:
            if row["path"] and row["caption"]:
                pairs.setdefault(row["path"], []).append(row["caption"])
    missing = [p for p in pairs if not (images_root / p).is_file()]
    for p in missing:
        del pairs[p]
    if not pairs:
        raise ClipkdError(f"none of the images named in {csv_path} exist under {images_root} "
                          f"(first missing: {missing[:3]})")
    return pairs, missing


def read_cnclip_texts(jsonl: str | Path, images: TsvImages) -> tuple[dict[str, list[str]], list[str]]:
    """``{image_id: [texts]}`` from a Chinese-CLIP ``*_texts.jsonl``, and the ids it names that the TSV lacks."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise ClipkdError(f"caption file not found: {jsonl}")
    pairs: dict[str, list[str]] = {}
    with jsonl.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, ids = row["text"], row["image_ids"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ClipkdError(f"{jsonl} line {n}: expected JSON with 'text' and 'image_ids' ({e})") from None
            for i in ids:
                pairs.setdefault(str(i), []).append(text)
    missing = [i for i in pairs if i not in images.offsets]
    for i in missing:
        del pairs[i]
    if not pairs:
        raise ClipkdError(f"none of the image ids in {jsonl} are in {images.path} (first missing: {missing[:3]})")
    return pairs, missing


@dataclass
class CaptionSource:
    """Where captioned images come from: an image root (CSV captions) or a Chinese-CLIP TSV."""

    root: Path
    pairs: dict[str, list[str]]
    missing: list[str] = field(default_factory=list)
    tsv: TsvImages | None = None
    labels: dict[str, str] | None = None  # WebDataset samples' labels, where the shards carry them

    @property
    def opener(self) -> Callable[[str], Image.Image] | None:
        return self.tsv.open if self.tsv is not None else None

    def captions(self) -> list[str]:
        return [c for caps in self.pairs.values() for c in caps]


def load_caption_source(images: str | Path, captions: str | Path | None) -> CaptionSource:
    """``images``: an image folder with ``captions`` a ``path,caption`` CSV, a ``*_imgs.tsv`` with a
    ``*_texts.jsonl``, or WebDataset shards (captions: their ``.txt`` members; ``captions`` unused). Captions
    naming a missing image are left out, counted and reported."""
    from .tars import is_tar_source, read_shards

    if is_tar_source(images):
        samples = read_shards(images)
        if not samples.captions:
            raise ClipkdError(f"no sample of {images} has a caption (.txt member)")
        labels = {k: str(v) for k, v in samples.labels.items()}
        return CaptionSource(samples.root, samples.captions, labels=labels or None)
    if captions is None:
        raise ClipkdError("`captions` is needed unless `images` are WebDataset shards with .txt captions")
    images = Path(images)
    if images.suffix == ".tsv" or str(captions).endswith(".jsonl"):
        tsv = TsvImages(images)
        pairs, missing = read_cnclip_texts(captions, tsv)
        what = f"image id(s) in {captions} are not in {images}"
        source = CaptionSource(images.parent, pairs, missing, tsv)
    else:
        if not images.is_dir():
            raise ClipkdError(f"image folder not found: {images}")
        pairs, missing = read_captions(captions, images)
        what = f"captioned image(s) not found under {images}"
        source = CaptionSource(images, pairs, missing)
    if missing:
        log.warning("%d %s were left out, e.g. %s", len(missing), what, missing[:3])
    return source


log = logging.getLogger(__name__)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def check_tokenizer_reads(model: Any, texts: list[str], role: str, max_unknown: float = 0.2) -> None:
    """Refuse a model whose tokenizer cannot read ``texts``: an English-only BPE tokenizer on mostly
    Chinese text, or a word-piece tokenizer mapping more than ``max_unknown`` of the tokens to ``[UNK]``."""
    sample = random.Random(0).sample(texts, min(len(texts), 500))
    if not sample:
        return
    if getattr(model, "language", "multi") == "en":
        cjk = sum(bool(_CJK.search(t)) for t in sample) / len(sample)
        if cjk > 0.5:
            raise ClipkdError(f"{role} {model.identity} has an English-only tokenizer, but {cjk:.0%} of the "
                              "captions are Chinese: use a Chinese-CLIP (cn_clip:...) or multilingual model, "
                              "or English captions")
        return
    unk = getattr(model, "unk_id", None)
    if unk is not None:
        tokens = model.tokenizer(sample)
        used = tokens[tokens != 0]
        frac = float((used == unk).float().mean()) if used.numel() else 0.0
        if frac > max_unknown:
            raise ClipkdError(f"{role} {model.identity}'s tokenizer maps {frac:.0%} of the caption tokens to "
                              "[UNK]: it cannot read the captions' language")


class CaptionDataset(ImageDataset):
    """Images with one randomly chosen caption per visit (``item["text"]``: its tokens;
    ``item["caption_id"]``: its row in :attr:`unique`).

    Distinct captions are tokenised once, up front, in batches; workers only index the result. ``kd_keys``: more
    items without a caption (stored views, uncaptioned images), after the captioned ones, trained with the
    distillation term alone: their ``caption_id`` is -1, their tokens zeros, their ``captioned`` false.
    ``opener``: decodes every key (default: the source's, for TSV rows).
    """

    def __init__(self, source: CaptionSource | str | Path, captions: dict[str, list[str]] | None,
                 transform: Callable, tokenizer: Callable[[list[str]], Any], batch: int = 4096,
                 targets: Any = None, kd_keys: Sequence[str] = (), opener: Callable[[str], Any] | None = None) -> None:
        if not isinstance(source, CaptionSource):
            source = CaptionSource(Path(source), captions or {})
        captioned = sorted(source.pairs)
        super().__init__(source.root, captioned + list(kd_keys), transform, opener=opener or source.opener,
                         targets=targets)
        self.n_captioned = len(captioned)
        self.unique = sorted({c for caps in source.pairs.values() for c in caps})
        pos = {c: i for i, c in enumerate(self.unique)}
        self.tokens = torch.cat([tokenizer(self.unique[i : i + batch]) for i in range(0, len(self.unique), batch)])
        self.caption_ids = [[pos[c] for c in source.pairs[p]] for p in captioned]
        self.mixed = bool(kd_keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if index < self.n_captioned:
            cid = random.choice(self.caption_ids[index])
            item["text"], item["caption_id"] = self.tokens[cid], torch.tensor(cid)
        else:
            item["text"], item["caption_id"] = torch.zeros_like(self.tokens[0]), torch.tensor(-1)
        if self.mixed:
            item["captioned"] = torch.tensor(index < self.n_captioned)
        return item


def subset_captions(captions: Path, per_class: int, out: Path) -> Path:
    """A ``path,caption`` CSV of the first ``per_class`` images of each class folder of ``captions``, with all their
    captions (a captioned fine-tuning set cut from a larger one)."""
    from ..fileio import write_text

    kept: dict[str, set[str]] = {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "caption"])
    with captions.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            have = kept.setdefault(row["path"].split("/")[0], set())
            if row["path"] in have or len(have) < per_class:
                have.add(row["path"])
                writer.writerow([row["path"], row["caption"]])
    write_text(out, buf.getvalue())
    return out
