"""A deployed model as a student: an exported ``.onnx`` file run by ONNX Runtime behind the :class:`Student`
interface, so ``eval``, ``predict``, ``index build`` and ``serve`` measure the artefact a user ships with the same
code that measures its PyTorch original.

Every clipkd export carries its own description in the ONNX metadata (key ``clipkd``, JSON): what the output is
(``embedding`` in a teacher's space, or ``classifier`` logits), the teacher identity, the class names, and the
preprocessing (size, mean, std, interpolation, resize mode, crop) — a consumer needs nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.preprocess import PreprocessConfig
from ..errors import ClipkdError, first_line
from .model import StudentConfig

ONNX_FORMAT = "clipkd-onnx/1"
META_KEY = "clipkd"


def set_metadata(m: Any, meta: dict[str, Any]) -> None:
    """Write clipkd's description (``meta``) into an ``onnx.ModelProto``'s metadata."""
    for p in list(m.metadata_props):
        if p.key == META_KEY:
            m.metadata_props.remove(p)
    entry = m.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps({"format": ONNX_FORMAT, **meta})
    m.producer_name = "clipkd"


def save_onnx_atomic(m: Any, out: Path) -> None:
    """``onnx.save`` to a temp file beside ``out``, then rename it over ``out``."""
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(m, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def student_metadata(cfg: StudentConfig, source: str) -> dict[str, Any]:
    """What an export of a student records: output kind and size, architecture, teacher, classes, preprocessing."""
    return {"kind": cfg.kind, "arch": cfg.arch, "out_dim": cfg.out_dim, "teacher": cfg.teacher,
            "classnames": list(cfg.classnames), "preprocess": cfg.preprocess.to_dict(), "source": source}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """clipkd's description of an exported model; a one-line error when the file lacks it (or is not ONNX)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ClipkdError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure: not an ONNX file
        raise ClipkdError(f"{path} is not a readable ONNX file: {first_line(e)}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ClipkdError(f"{path} has no clipkd metadata (preprocessing, output kind): export it with "
                          "`clipkd export`, or add the metadata it would write")
    try:
        meta = json.loads(props[META_KEY])
    except json.JSONDecodeError as e:
        raise ClipkdError(f"{path}: clipkd metadata is not JSON ({e})") from None
    if meta.get("format") != ONNX_FORMAT or "preprocess" not in meta or "kind" not in meta:
        raise ClipkdError(f"{path}: clipkd metadata lacks the format, preprocessing or output kind ({ONNX_FORMAT})")
    return meta


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


def onnx_providers(device: str | torch.device | None = None) -> list[str]:
    """ONNX Runtime providers: CUDA first when asked for (or ``auto``) and present, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    want_cuda = device is None or str(device) in ("auto",) or str(device).startswith("cuda")
    return (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in have else []) + [
        "CPUExecutionProvider"]


class OnnxStudent(nn.Module):
    """An exported model behind the :class:`Student` interface: ``cfg`` from its metadata, ``forward`` through
    ONNX Runtime (inputs taken to the CPU as fp32, outputs returned on the input's device)."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        meta = read_metadata(self.path)
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
        try:
            self.session = ort.InferenceSession(str(self.path), providers=onnx_providers(device))
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors are long
            raise ClipkdError(f"ONNX Runtime cannot load {self.path}: {first_line(e)}") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        return torch.from_numpy(out).to(x.device)

    def to(self, *args: Any, **kwargs: Any) -> OnnxStudent:  # the session chose its device when it was made
        return self


def load_onnx_student(path: str | Path, device: str | torch.device | None = None) -> OnnxStudent:
    """Load an exported ``.onnx`` as a student (see :class:`OnnxStudent`)."""
    return OnnxStudent(path, device)


class OnnxTextTower:
    """An exported CLIP text tower (``clipkd export --tower text``): texts → L2-normalised embeddings through ONNX
    Runtime, tokenised by the tokenizer its metadata names. Stands in for the CLIP wherever clipkd needs text only
    (``embed-text``, an index's ``--text-model``): a deployed student plus this file need no PyTorch CLIP."""

    has_text = True

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        meta = read_metadata(self.path)
        tok = meta.get("tokenizer") or {}
        if meta["kind"] != "text_embedding" or tok.get("backend") != "open_clip":
            raise ClipkdError(f"{self.path} is not an exported open_clip text tower (clipkd export --tower text)")
        import open_clip

        from ..teachers import openclip  # noqa: F401 - registers clipkd's own architectures with open_clip

        self.meta = meta
        self.tokenizer = open_clip.get_tokenizer(tok["model"])
        self.identity, self.embed_dim = meta["teacher"], int(meta["out_dim"])
        self.logit_scale = float(meta.get("logit_scale", 100.0))
        try:
            self.session = ort.InferenceSession(str(self.path), providers=onnx_providers(device))
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors are long
            raise ClipkdError(f"ONNX Runtime cannot load {self.path}: {first_line(e)}") from None
        self.input_name = self.session.get_inputs()[0].name

    def require_text(self, why: str = "text embeddings") -> None:
        """It always has text (the :class:`~clipkd.teachers.base.ClipModel` interface)."""

    @torch.no_grad()
    def encode_text(self, texts: Any, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised fp32 text embeddings (on CPU)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).long().numpy()
            feats = torch.from_numpy(self.session.run(None, {self.input_name: tokens})[0]).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)
