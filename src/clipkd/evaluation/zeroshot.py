"""Zero-shot evaluation and prediction for teachers and students, through one scoring path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import load_labelled
from ..data.encode import encode_dataset
from ..data.folders import LabelledImages
from ..data.loader import ImageDataset, load_rgb
from ..data.splits import load_split
from ..errors import ClipkdError
from ..prompts import DEFAULT_TEMPLATES, TextEmbeddings, build_prompts, embed_prompts, load_templates
from . import metrics


@dataclass
class Calibration:
    """Calibrated stacking: seen-class scores lowered by ``gamma`` (chosen on ``chosen_on`` for maximum H)."""

    gamma: float
    S: float
    U: float
    H: float
    chosen_on: str | None = None


@dataclass
class EvalResult:
    """One ``clipkd eval``: zero-shot accuracy, and with a split the GZSL figures (fractions in [0, 1])."""

    model: str
    images: str
    n_images: int
    skipped: int
    n_classes: int
    top1: float
    top5: float
    per_class_top1: float
    S: float | None = None
    U: float | None = None
    H: float | None = None
    calibrated: Calibration | None = None
    ausuc: float | None = None
    curve: dict[str, list[float]] | None = field(default=None, repr=False)

    def to_dict(self, curve: bool = True) -> dict[str, Any]:
        """Plain JSON (GZSL keys only when a split was given; ``curve=False`` leaves the curve out)."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if not curve:
            d.pop("curve", None)
        return d

    def save(self, out: str | Path) -> Path:
        """Write the result as JSON, and its seen–unseen curve as a PNG beside it when it has one."""
        from .report import write_eval

        return write_eval(self.to_dict(), out)


@dataclass
class Prediction:
    """Top-k classes of one image file (or why it could not be read)."""

    file: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


class Scorer:
    """Images → an (N, C) score matrix over ``classnames`` and the matching probabilities."""

    def __init__(self, name: str, classnames: list[str], preprocess: Callable, device: torch.device,
                 forward: Callable[[torch.Tensor], torch.Tensor], temperature: float) -> None:
        self.name, self.classnames, self.preprocess, self.device = name, classnames, preprocess, device
        self._forward, self.temperature = forward, temperature

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Scores on CPU (cosine similarities or logits; ``-inf`` for classes a classifier lacks)."""
        return self._forward(images.to(self.device, non_blocking=True)).float().cpu()

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax of ``temperature × scores``."""
        return F.softmax(self.temperature * scores, dim=-1)


def load_scorer(model: str, classnames: Sequence[str] | None = None, text: str | Path | None = None,
                templates: str = DEFAULT_TEMPLATES, device: str | None = "auto", precision: str = "auto") -> Scorer:
    """A scorer for a teacher spec (``open_clip:...``), a ``clip-train`` run folder, or a student (run folder,
    ``student.pt`` or exported ``.onnx``).

    Embedding models score by cosine similarity with ``text`` embeddings (a teacher without
    ``text`` embeds ``classnames`` with ``templates`` itself); classifier students use their head.
    Scores cover ``classnames`` (default: those of ``text``).
    """
    from ..models import is_student, load_image_model

    text_emb = TextEmbeddings.load(text) if text else None
    if classnames is None and text_emb is None and not is_student(model):  # before the teacher loads
        raise ClipkdError("need `text` (class text embeddings) or class names (`classes`)")
    m = load_image_model(model, device, precision)
    dev = m.device
    if classnames is None:
        if text_emb is not None:
            classnames = text_emb.classnames
        elif m.kind == "classifier":
            classnames = m.classnames
        else:
            raise ClipkdError("need `text` (class text embeddings) or class names (`classes`)")
    classnames = list(classnames)
    if m.kind == "classifier":
        pos = {c: i for i, c in enumerate(classnames)}
        extra = [c for c in m.classnames if c not in pos]
        if extra:
            raise ClipkdError(f"classifier classes {extra[:5]} are not among the evaluated classes")
        cols = torch.tensor([pos[c] for c in m.classnames], device=dev)

        def forward(x: torch.Tensor) -> torch.Tensor:
            logits = m.forward(x).float()
            full = logits.new_full((len(x), len(classnames)), float("-inf"))
            return full.index_copy_(1, cols, logits)

        return Scorer(str(model), classnames, m.preprocess, dev, forward, 1.0)
    if m.kind == "student":
        if text_emb is None:
            raise ClipkdError(f"student {model} classifies through text embeddings: pass `text` "
                              "(made by `clipkd embed-text` with its teacher)")
        if text_emb.teacher != m.space:
            raise ClipkdError(f"student {model} was distilled from '{m.space}' but the text embeddings "
                              f"{text} come from '{text_emb.teacher}'")
        if text_emb.embeddings.shape[1] != m.embed_dim:
            raise ClipkdError(f"student embedding size {m.embed_dim} != text embedding size "
                              f"{text_emb.embeddings.shape[1]}")
        encode = lambda x: F.normalize(m.forward(x).float(), dim=-1)  # noqa: E731
        temperature = text_emb.logit_scale
    else:  # a teacher spec or a clip-train run
        teacher = m.clip
        if text_emb is None:
            text_emb = embed_prompts(teacher, build_prompts(classnames, load_templates(templates)))
        elif text_emb.teacher != teacher.identity:
            raise ClipkdError(f"text embeddings {text} come from '{text_emb.teacher}', not from '{teacher.identity}'")
        encode, temperature = teacher.encode_image, teacher.logit_scale
    weights = torch.from_numpy(text_emb.select(classnames).embeddings).to(dev)
    return Scorer(str(model), classnames, m.preprocess, dev, lambda x: encode(x) @ weights.T, temperature)


def score_folder(scorer: Scorer, data: LabelledImages, batch_size: int = 128, workers: int | None = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores and labels (indices into ``scorer.classnames``) for every decodable image; skipped paths."""
    pos = {c: i for i, c in enumerate(scorer.classnames)}
    missing = [c for c in data.classnames if c not in pos]
    if missing:
        raise ClipkdError(f"{len(missing)} class folder(s) of {data.root} have no text embedding: {missing[:5]}")
    remap = np.array([pos[c] for c in data.classnames])
    enc = encode_dataset(scorer.scores, ImageDataset(data.root, data.paths, scorer.preprocess, labels=data.labels),
                         batch_size, workers, progress, desc=f"eval {Path(scorer.name).name}")
    return enc.outputs.numpy(), remap[np.asarray(enc.labels)], [data.paths[i] for i, _ in enc.skipped]


def evaluate(
    model: str,
    images: str | Path,
    text: str | Path | None = None,
    split: str | Path | None = None,
    val: str | Path | None = None,
    templates: str = DEFAULT_TEMPLATES,
    batch_size: int = 128,
    workers: int | None = None,
    device: str | None = "auto",
    progress: bool = True,
    out: str | Path | None = None,
) -> EvalResult:
    """Zero-shot top-1/top-5/per-class accuracy on a labelled folder; with ``split``, GZSL too.

    GZSL: S, U, H at gamma=0; calibrated stacking with gamma chosen on ``val`` (maximum H); the
    seen–unseen curve and its area (AUSUC). Accuracies are fractions in [0, 1]. ``out``: also write
    the result JSON there (and the seen–unseen curve PNG beside it).
    """
    from ..fileio import check_out_file, ref

    model = ref(model)
    if out is not None:
        check_out_file(out, "results file")
    data = load_labelled(images)
    classnames = TextEmbeddings.load(text).classnames if text else list(data.classnames)
    sp = load_split(split, classnames, data.aliases) if split is not None else None  # fail before any scoring
    scorer = load_scorer(model, classnames, text, templates, device)
    scores, labels, skipped = score_folder(scorer, data, batch_size, workers, progress)
    pred = scores.argmax(1)
    result = EvalResult(str(model), str(images), int(len(labels)), len(skipped), len(classnames),
                        top1=metrics.topk_accuracy(scores, labels, 1), top5=metrics.topk_accuracy(scores, labels, 5),
                        per_class_top1=metrics.per_class_accuracy(pred, labels))
    if sp is not None:
        seen = np.array(sp.seen_mask(classnames))
        g0 = metrics.gzsl(scores, labels, seen)
        result.S, result.U, result.H = g0.S, g0.U, g0.H
        gamma = 0.0
        if val is not None:
            vscores, vlabels, _ = score_folder(scorer, load_labelled(val), batch_size, workers, progress)
            gamma = metrics.choose_gamma(vscores, vlabels, seen)
        cal = metrics.gzsl(scores, labels, seen, gamma)
        result.calibrated = Calibration(gamma, cal.S, cal.U, cal.H, str(val) if val else None)
        _, S, U = metrics.seen_unseen_curve(scores, labels, seen)
        result.ausuc = metrics.ausuc(S, U)
        keep = np.unique(np.linspace(0, len(S) - 1, min(len(S), 200)).round().astype(int))
        result.curve = {"S": S[keep].round(5).tolist(), "U": U[keep].round(5).tolist()}
    if out is not None:
        result.save(out)
    return result


def predict(model: str, files: Sequence[str | Path], text: str | Path | None = None,
            classnames: Sequence[str] | None = None, topk: int = 5, device: str | None = "auto") -> list[Prediction]:
    """Top-``k`` class names with probabilities for each image file (unreadable files get an ``error``)."""
    scorer = load_scorer(model, classnames, text, device=device)
    out = []
    for f in files:
        try:
            x = scorer.preprocess(load_rgb(f)).unsqueeze(0)
        except Exception as e:  # noqa: BLE001 - report the file and go on
            out.append(Prediction(str(f), error=f"{type(e).__name__}: {e}"))
            continue
        probs = scorer.probabilities(scorer.scores(x))[0]
        p, idx = probs.topk(min(topk, len(scorer.classnames)))
        out.append(Prediction(str(f), [(scorer.classnames[i], round(float(q), 5))
                                       for q, i in zip(p.tolist(), idx.tolist(), strict=True)]))
    return out


@dataclass
class FramePrediction:
    """Top-k classes of one video frame, and the frames per second reached so far (decode + preprocess + model)."""

    frame: int
    top: list[tuple[str, float]]
    fps: float


def open_video(source: str | int):
    """An OpenCV capture of a video file or a camera (an integer index); a one-line error when it cannot open."""
    try:
        import cv2
    except ImportError:
        raise ClipkdError("`video` needs OpenCV: pip install opencv-python-headless") from None
    if isinstance(source, str) and source.isdigit():
        source = int(source)
    if isinstance(source, str) and not Path(source).is_file():
        raise ClipkdError(f"video file not found: {source}")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise ClipkdError(f"cannot open video {source!r} (not a video OpenCV can decode, or no such camera)")
    return cap


def predict_video(model: str, source: str | int, text: str | Path | None = None,
                  classnames: Sequence[str] | None = None, topk: int = 5, device: str | None = "auto",
                  every: int = 1, max_frames: int | None = None):
    """Yield a :class:`FramePrediction` for every ``every``-th frame of a video file or camera (the seed's live
    demo), through the same scorer as :func:`predict`."""
    import time

    from PIL import Image

    if every < 1:
        raise ClipkdError(f"`every` must be ≥ 1, got {every}")
    scorer = load_scorer(model, classnames, text, device=device)
    cap = open_video(source)
    import cv2

    try:
        t0, done, index = time.perf_counter(), 0, -1
        while max_frames is None or done < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            index += 1
            if index % every:
                continue
            x = scorer.preprocess(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))).unsqueeze(0)
            probs = scorer.probabilities(scorer.scores(x))[0]
            p, idx = probs.topk(min(topk, len(scorer.classnames)))
            done += 1
            yield FramePrediction(index, [(scorer.classnames[i], round(float(q), 5))
                                          for q, i in zip(p.tolist(), idx.tolist(), strict=True)],
                                  done / max(time.perf_counter() - t0, 1e-9))
    finally:
        cap.release()
