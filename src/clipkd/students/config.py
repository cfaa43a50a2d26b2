"""A student's description (backbone, output, preprocessing, provenance): a leaf both the PyTorch student
(:mod:`.model`) and its ONNX Runtime twin (:mod:`.onnx`) read, so neither imports the other to know it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig


@dataclass
class StudentConfig:
    """Everything needed to rebuild a student: backbone, output, preprocessing, provenance.

    ``kind`` is ``embedding`` (output lives in the teacher's space; classify through text
    embeddings) or ``classifier`` (output = logits over ``classnames``; the normal baseline).
    """

    arch: str
    out_dim: int
    kind: str = "embedding"
    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    classnames: list[str] = field(default_factory=list)
    teacher: str = ""
    pretrained: bool | str = False  # True: timm's hub weights; a path: a local weights file for this architecture

    @property
    def preprocess(self) -> PreprocessConfig:
        """The student's preprocessing: bicubic shortest-side resize, center crop, normalise."""
        return PreprocessConfig(size=(self.image_size, self.image_size), mean=tuple(self.mean), std=tuple(self.std))
