"""A deployed model as a student: an exported ``.onnx`` file run by ONNX Runtime behind the :class:`Student`
interface, so ``eval``, ``predict``, ``index build`` and ``serve`` measure the artefact a user ships with the same
code that measures its PyTorch original.

Every clipkd export carries its own description in the ONNX metadata (key ``clipkd``, JSON): what the output is
(``embedding`` in a teacher's space, or ``classifier`` logits), the teacher identity, the class names, and the
preprocessing (size, mean, std, interpolation, resize mode, crop) — a consumer needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.preprocess import PreprocessConfig
from ..errors import ClipkdError
from ..onnxfile import (
    META_KEY,
    ONNX_FORMAT,
    onnx_providers,
    open_session,
    read_metadata,
    save_onnx_atomic,
    set_metadata,
)
from ..teachers.onnx_text import OnnxTextTower
from .config import StudentConfig

__all__ = ["META_KEY", "ONNX_FORMAT", "OnnxConfig", "OnnxStudent", "OnnxTextTower", "load_onnx_student",
           "onnx_providers", "read_metadata", "save_onnx_atomic", "set_metadata", "student_metadata"]


def student_metadata(cfg: StudentConfig, source: str) -> dict[str, Any]:
    """What an export of a student records: output kind and size, architecture, teacher, classes, preprocessing."""
    return {"kind": cfg.kind, "arch": cfg.arch, "out_dim": cfg.out_dim, "teacher": cfg.teacher,
            "classnames": list(cfg.classnames), "preprocess": cfg.preprocess.to_dict(), "source": source}


@dataclass
class OnnxConfig(StudentConfig):
    """A :class:`StudentConfig` whose preprocessing is whatever the export recorded (a CLIP tower may squash or
    pad where a timm student resizes and crops)."""

    preprocess_dict: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    source: str = ""

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess_dict)


class OnnxStudent(nn.Module):
    """An exported model behind the :class:`Student` interface: ``cfg`` from its metadata, ``forward`` through
    ONNX Runtime (inputs taken to the CPU as fp32, outputs returned on the input's device)."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session, meta, _ = open_session(self.path, device)
        if meta["kind"] == "text_embedding":
            raise ClipkdError(f"{self.path} is an exported text tower: use it for text (embed-text --teacher, "
                              "index build --text-model), not as an image model")
        pre = PreprocessConfig.from_dict(meta["preprocess"])
        self.meta = meta
        self.cfg = OnnxConfig(arch=meta.get("arch", "onnx"), out_dim=int(meta["out_dim"]), kind=meta["kind"],
                              image_size=pre.side, mean=pre.mean, std=pre.std,
                              classnames=list(meta.get("classnames", [])), teacher=meta.get("teacher", ""),
                              preprocess_dict=pre.to_dict(),
                              precision=meta.get("precision", "fp32"), source=meta.get("source", ""))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        return torch.from_numpy(out).to(x.device)

    def to(self, *args: Any, **kwargs: Any) -> OnnxStudent:  # the session chose its device when it was made
        return self


def load_onnx_student(path: str | Path, device: str | torch.device | None = None) -> OnnxStudent:
    """Load an exported ``.onnx`` as a student (see :class:`OnnxStudent`)."""
    return OnnxStudent(path, device)
