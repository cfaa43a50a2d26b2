"""One model layer: every kind of model clipkd embeds images or text with, behind one pair of loaders.

``load_image_model(x)`` takes a teacher spec (``open_clip:...``), a ``clip-train`` run folder, a distilled student
(run folder, ``student.pt``) or an exported image tower (``.onnx``) and returns an :class:`ImageModel`: identity,
embedding size, preprocessing, ``encode_image``. ``load_text_model(x)`` takes a spec, a run folder or an exported
text tower and returns a text model (``identity``, ``logit_scale``, ``encode_text``). Evaluation, prediction, the
search index and service, export and ``embed-text`` all load through here, so a new kind of model is one branch in
this file (a new CLIP backend is one module in ``teachers/``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image

from .data.preprocess import PreprocessConfig
from .deployed import check_text_space, student_identity
from .errors import ClipkdError
from .teachers import load_teacher, load_text_model, resolve_device, resolve_model

__all__ = ["ImageEncoder", "ImageModel", "TextEncoder", "image_cost", "image_costs", "is_student", "load_image_model",
           "load_text_model", "resolve_model", "with_text"]


@runtime_checkable
class ImageEncoder(Protocol):
    """What every image model offers: its identity, embedding size, preprocessing and a batch encoder."""

    identity: str
    embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    preprocess_cfg: PreprocessConfig

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """What every text model offers (a CLIP teacher, a fine-tuned CLIP, an exported text tower)."""

    identity: str
    logit_scale: float

    def require_text(self, why: str = ...) -> None: ...

    def encode_text(self, texts: Sequence[str], batch_size: int = ...) -> torch.Tensor: ...


def is_student(model: str | Path) -> bool:
    """A student run folder, ``student.pt`` or an exported ``.onnx`` image tower (anything else: a CLIP spec or a
    ``clip-train`` run)."""
    from .students.model import is_student as _is_student

    return _is_student(model)


@dataclass
class ImageModel:
    """Images → unit vectors (or, for a classifier student, logits), with the identity that names them.

    ``kind``: ``clip`` (a teacher or fine-tuned CLIP: ``clip`` is set and is also its text tower), ``student``
    (an embedding student in its teacher's space: ``space`` is that teacher's identity) or ``classifier`` (the
    supervised baseline: ``classnames`` are its outputs). ``student`` / ``clip``: the loaded network, for the
    consumers that need more than ``encode_image`` (export, a classifier's head).
    """

    identity: str
    embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    preprocess_cfg: PreprocessConfig
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    kind: str = "clip"  # clip | student | classifier
    space: str = ""  # the identity of the embedding space (a student's teacher; a CLIP's own identity)
    source: str = ""  # what the user named
    spec: str = ""  # what loads it again: a CLIP's spec (a clip-train run's, resolved), a student's path
    text: Any = None  # a text model in the same space (None: image queries only)
    student: Any = None
    clip: Any = None
    classnames: list[str] = field(default_factory=list)
    runtime: str = "torch"  # what runs it (a deployed model's is onnx: clipkd.deployed)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 embeddings of a preprocessed batch (on CPU)."""
        return F.normalize(self.forward(images.to(self.device)).float(), dim=-1).cpu()

    def encode_batch(self, items: Sequence[torch.Tensor]) -> Any:
        """Unit embeddings (numpy) of preprocessed images (:attr:`preprocess`), one forward for the batch: what the
        search index and service call, alike for this and a deployed model (:mod:`clipkd.deployed`)."""
        return self.encode_image(torch.stack(list(items))).numpy()

    @property
    def has_text(self) -> bool:
        return self.text is not None and bool(getattr(self.text, "has_text", True))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings in the image space; a one-line error when there is no text tower."""
        if not self.has_text:
            hint = (" (a distilled student: pass `text_model` with its teacher's spec)" if self.kind == "student"
                    else "")
            raise ClipkdError(f"{self.identity} has no text tower for text queries{hint}")
        return self.text.encode_text(list(texts))

    @property
    def logit_scale(self) -> float:
        return float(getattr(self.text, "logit_scale", 100.0))

    def describe(self) -> dict[str, Any]:
        """What an index records about the model (the store's ``teacher`` field holds the identity)."""
        return {"teacher": self.identity, "embed_dim": self.embed_dim, "preprocess": self.preprocess_cfg.to_dict()}


def _student_model(model: str | Path, dev: torch.device, fold: bool = True) -> ImageModel:
    from .students.model import load_student, student_transform

    student = load_student(model, reparameterize=fold).to(dev)
    cfg = student.cfg
    pt = Path(model) / "student.pt" if Path(model).is_dir() else Path(model)
    return ImageModel(student_identity(cfg.arch, pt), cfg.out_dim, student_transform(cfg),
                      cfg.preprocess, student, dev, kind="student" if cfg.kind == "embedding" else "classifier",
                      space=cfg.teacher, source=str(model), spec=str(model), student=student,
                      classnames=list(cfg.classnames))


def load_image_model(model: str | Path, device: str | None = "auto", precision: str = "auto",
                     fold: bool = True) -> ImageModel:
    """An :class:`ImageModel` for a teacher spec, a ``clip-train`` run folder, a distilled student (run folder or
    ``student.pt``) or an exported image tower (``.onnx``). A CLIP brings its own text tower (``.text``).
    ``fold=False`` keeps a reparameterizable student's training-time branches (the layout its timm name builds)."""
    from .fileio import ref

    model = ref(model)
    dev = resolve_device(device)
    if is_student(model):
        return _student_model(model, dev, fold)
    spec = resolve_model(model)
    clip = load_teacher(spec, device=str(dev), precision=precision)
    return ImageModel(clip.identity, clip.embed_dim, clip.preprocess, clip.preprocess_cfg, clip.encode_image, dev,
                      kind="clip", space=clip.identity, source=str(model), spec=spec,
                      text=clip if clip.has_text else None, clip=clip)


def with_text(image: ImageModel, text_model: Any, device: str | None = "auto", precision: str = "auto") -> ImageModel:
    """``image`` with ``text_model``'s text tower for text queries: only for a student, and only when the text model
    is the teacher whose space the student was distilled into."""
    if text_model is None:
        return image
    if image.kind == "clip":
        raise ClipkdError(f"{image.source} is a CLIP with its own text tower; `text_model` is for distilled students")
    text = load_text_model(text_model, device, precision)
    check_text_space(text.identity, image.space, text_model)
    image.text = text
    return image


def image_cost(model: str | Path, repeats: int = 200) -> dict[str, float]:
    """Image-tower size (M parameters), FLOPs per image, and CPU time per image at batch 1 (latency) and at batch 64
    (throughput), measured on this machine: :func:`image_costs` of one model."""
    return image_costs([model], repeats)[0]


def image_costs(models: Sequence[str | Path], repeats: int = 200, rounds: int = 5,
                threads: int | None = None) -> list[dict[str, float]]:
    """:func:`image_cost` of several models measured side by side, so that their ratios hold on a noisy machine:
    in each of ``rounds`` rounds every model in turn runs ``repeats // rounds`` batch-1 and 2 batch-64 passes (after
    a warm-up); each model's figure is its lowest round median (the round least disturbed by the rest of the
    machine), and the models share every round's conditions. ``threads``: torch's CPU threads for the timings (this
    process's setting when None; restored after); recorded as ``cpu_threads``."""
    if rounds < 1 or repeats < rounds:
        raise ClipkdError(f"image_costs: need rounds >= 1 and repeats >= rounds, got {repeats} and {rounds}")
    if threads is not None and threads < 1:
        raise ClipkdError(f"image_costs: threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or before)
        return _image_costs(models, repeats, rounds)
    finally:
        torch.set_num_threads(before)


def _image_costs(models: Sequence[str | Path], repeats: int, rounds: int) -> list[dict[str, float]]:
    import time

    from torch.utils.flop_counter import FlopCounterMode

    loaded = [load_image_model(m, device="cpu") for m in models]
    inputs, out = [], []
    for m in loaded:
        x = torch.randn(1, 3, *m.preprocess_cfg.size)
        with FlopCounterMode(display=False) as fc:
            m.encode_image(x)
        tower = m.student if m.student is not None else m.clip.model.visual
        inputs.append((x, x.expand(64, -1, -1, -1).contiguous()))
        out.append({"image_params_m": round(sum(p.numel() for p in tower.parameters()) / 1e6, 3),
                    "image_mflops": round(fc.get_total_flops() / 1e6, 2)})

    def median_ms(m: ImageModel, batch: torch.Tensor, n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            m.encode_image(batch)
            times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2] / len(batch)

    with torch.inference_mode():
        for m, (x1, x64) in zip(loaded, inputs, strict=True):  # warm-up: allocator, kernels, caches
            median_ms(m, x1, 20)
            median_ms(m, x64, 2)
        b1 = [[] for _ in loaded]
        b64 = [[] for _ in loaded]
        for _ in range(rounds):
            for i, (m, (x1, x64)) in enumerate(zip(loaded, inputs, strict=True)):
                b1[i].append(median_ms(m, x1, repeats // rounds))
                b64[i].append(median_ms(m, x64, 2))
    for o, t1, t64 in zip(out, b1, b64, strict=True):
        o["cpu_ms_per_image"] = round(min(t1), 3)
        o["cpu_ms_per_image_b64"] = round(min(t64), 4)
        o["cpu_threads"] = torch.get_num_threads()
    return out
