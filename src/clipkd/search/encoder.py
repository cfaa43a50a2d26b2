"""What a search index embeds with: any model clipkd can embed images with, plus a text tower when there is one.

A ``clip-train`` run or a teacher spec brings its own text tower. A distilled timm student lives in its teacher's
embedding space, so the teacher's text tower (``text_model``) searches the student's index: text search at student
cost for the images, one text forward per query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.preprocess import PreprocessConfig
from ..errors import ClipkdError
from ..students.model import is_student


@dataclass
class Encoder:
    """Images (and text, when ``text`` is set) → unit vectors in one space, with the identity that names them."""

    identity: str
    embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    preprocess_cfg: PreprocessConfig
    image_fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    text: Any = None  # a ClipModel whose text tower shares the space (None: image queries only)
    kind: str = "clip"  # clip | student

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 embeddings of a preprocessed batch (on CPU)."""
        return F.normalize(self.image_fn(images.to(self.device)).float(), dim=-1).cpu()

    @property
    def has_text(self) -> bool:
        return self.text is not None and self.text.has_text

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings in the image space; a one-line error when there is no text tower."""
        if not self.has_text:
            hint = (" (a distilled student: pass --text-model with its teacher's spec)" if self.kind == "student"
                    else "")
            raise ClipkdError(f"{self.identity} has no text tower for text queries{hint}")
        return self.text.encode_text(list(texts))

    @property
    def logit_scale(self) -> float:
        return float(getattr(self.text, "logit_scale", 100.0))

    def describe(self) -> dict[str, Any]:
        """What an index records about the model (the store's ``teacher`` field holds the identity)."""
        return {"teacher": self.identity, "embed_dim": self.embed_dim, "preprocess": self.preprocess_cfg.to_dict()}


def load_encoder(model: str | Path, text_model: str | Path | None = None, device: str | None = "auto",
                 precision: str = "auto") -> Encoder:
    """An :class:`Encoder` for a teacher spec, a ``clip-train`` run folder, or a distilled student.

    ``text_model``: for a student, the teacher (spec or clip-train run) whose text tower shares its space —
    refused unless its identity is the one the student was distilled from.
    """
    from ..evaluation.retrieval import resolve_model
    from ..teachers import load_teacher
    from ..teachers.base import file_fingerprint, resolve_device

    dev = resolve_device(device)
    if is_student(model):
        from ..students.model import load_student, student_transform

        student = load_student(model).to(dev)
        cfg = student.cfg
        if cfg.kind != "embedding":
            raise ClipkdError(f"{model} is a classifier (the supervised baseline); search needs an embedding student")
        pt = Path(model) / "student.pt" if Path(model).is_dir() else Path(model)
        text = None
        if text_model is not None:
            if str(text_model).endswith(".onnx"):  # the teacher's text tower, exported
                from ..students.onnx import OnnxTextTower

                text = OnnxTextTower(text_model, dev)
            else:
                text = load_teacher(resolve_model(text_model), device=str(dev), precision=precision)
            if text.identity != cfg.teacher:
                raise ClipkdError(f"--text-model {text_model} is '{text.identity}', but the student was distilled from "
                                  f"'{cfg.teacher}': its text would land in another space")
        return Encoder(f"student:{cfg.arch}@{pt.name}#{file_fingerprint(pt)}", cfg.out_dim, student_transform(cfg),
                       cfg.preprocess, student, dev, text, kind="student")
    if text_model is not None:
        raise ClipkdError(f"{model} is a CLIP with its own text tower; --text-model is for distilled students")
    clip = load_teacher(resolve_model(model), device=str(dev), precision=precision)
    return Encoder(clip.identity, clip.embed_dim, clip.preprocess, clip.preprocess_cfg, clip.encode_image, dev,
                   clip if clip.has_text else None)
