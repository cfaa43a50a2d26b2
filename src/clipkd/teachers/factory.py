"""Spec strings → CLIP models, through a registry of backends (``open_clip``, ``hf``, ``cn_clip``, ``modelscope``).

Two entry points over the same backends: :func:`load_teacher` gives a frozen encoder (eval mode, no
gradients) and :func:`load_clip` a CLIP ready to be trained by ``clip-train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ClipkdError
from .base import ClipModel, resolve_device, resolve_precision
from .registry import BACKENDS, register_backend

__all__ = ["BACKENDS", "check_teacher_spec", "list_backends", "load_clip", "load_teacher", "load_text_model",
           "register_backend", "resolve_model", "teacher_identity"]


def list_backends() -> list[str]:
    """Registered backend prefixes."""
    _import_builtin()
    return sorted(BACKENDS)


def _import_builtin() -> None:
    from . import cnclip, hf, modelscope, openclip  # noqa: F401  (each registers itself)


def _split(spec: str) -> tuple[str, str]:
    _import_builtin()
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in BACKENDS:
        if "/" in spec or spec.startswith((".", "~")) or spec.endswith((".pt", ".onnx", ".json")):
            raise ClipkdError(f"'{spec}': no such file or folder (a model is a spec such as open_clip:ARCH@TAG, a "
                              "run folder or a model file)")
        raise ClipkdError(
            f"model spec '{spec}' must start with a backend prefix, one of: "
            + ", ".join(f"{b}:" for b in sorted(BACKENDS))
        )
    return backend, rest


def check_teacher_spec(spec: str) -> None:
    """Refuse a teacher spec that names no weights (it would embed with random ones) unless it says ``@random``; a
    ``clip-train`` run folder is checked as the spec its ``run.json`` names."""
    backend, rest = _split(resolve_model(spec))
    no_weights = BACKENDS.entry(backend).meta.get("no_weights")
    if no_weights is not None and no_weights(rest):
        model = rest.rstrip("@")
        raise ClipkdError(f"teacher '{spec}' names no weights, so it would embed with random ones; give a "
                          f"pretrained tag or a checkpoint file ({backend}:{model}@TAG or {backend}:{model}@/path/to/"
                          f"weights), or {backend}:{model}@random if random weights are what you want")


def _build(spec: str, device: str | None, precision: str) -> ClipModel:
    backend, rest = _split(spec)
    dev = resolve_device(device)
    return BACKENDS.get(backend)(rest, dev, resolve_precision(precision, dev))


def resolve_model(model: str | Path) -> str:
    """A model spec, or a ``clip-train`` run folder (its ``run.json`` names the spec of the trained model)."""
    from ..fileio import read_json

    p = Path(model)
    if p.is_dir():
        if not (p / "run.json").is_file():
            raise ClipkdError(f"{p} is not a clip-train run folder (no run.json)")
        info = read_json(p / "run.json", "clip-train run")
        spec = info.get("spec") or info.get("teacher_spec")  # teacher_spec: run folders of clipkd 0.1
        if not spec:
            raise ClipkdError(f"{p / 'run.json'} names no model spec")
        return _own_weights(spec, p)
    return str(model)


def _own_weights(spec: str, run: Path) -> str:
    """A run folder's spec names its weights by absolute path; a copied or moved folder loads the weights file it
    holds itself (same name), not the original's."""
    head, sep, weights = spec.rpartition("@")
    if sep and weights and Path(weights).is_absolute() and (run / Path(weights).name).is_file():
        return f"{head}@{(run / Path(weights).name).resolve()}"
    return spec


def teacher_identity(spec: str | Path) -> str:
    """The identity a teacher loaded from ``spec`` (or a ``clip-train`` run folder) records, computed without
    loading it (a weights file is fingerprinted): what ``store-import`` and ``import-text`` record, so that the same
    teacher's own stores and text embeddings are recognised as one teacher's. A backend that cannot tell without
    loading, or a name that is not a spec (a label from another tool), is kept as given."""
    from ..fileio import ref

    spec = resolve_model(ref(spec))
    _import_builtin()
    backend, sep, rest = str(spec).partition(":")
    if not sep or backend not in BACKENDS:
        return str(spec)
    identity = BACKENDS.entry(backend).meta.get("identity")
    return identity(rest) if identity is not None else spec


def load_teacher(spec: str | Path, device: str | None = "auto", precision: str = "auto") -> ClipModel:
    """A frozen CLIP encoder from a spec such as ``open_clip:ViT-B-32@laion2b_s34b_b79k`` or a ``clip-train`` run
    folder (eval mode, no grads).

    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...; ``precision``: ``auto`` (fp16 on GPU,
    fp32 on CPU), ``fp32``, ``fp16`` or ``bf16`` (GPU autocast only). A spec that names no weights is
    refused (:func:`check_teacher_spec`); ``@random`` asks for random weights explicitly.
    """
    from ..fileio import ref

    spec = resolve_model(ref(spec))
    check_teacher_spec(spec)
    model = _build(spec, device, precision)
    model.model.eval().requires_grad_(False)
    return model


def load_text_model(model: Any, device: str | None = "auto", precision: str = "auto") -> Any:
    """Whatever clipkd can embed text with: a teacher spec, a ``clip-train`` run folder, an exported text tower
    (``.onnx``, run by ONNX Runtime), or an already loaded model (returned as it is). The result has
    ``identity``, ``logit_scale``, ``require_text`` and ``encode_text``; a model without a text tower is refused."""
    if isinstance(model, (str, Path)):
        p = Path(model)
        if p.suffix == ".onnx":
            from .onnx_text import OnnxTextTower

            model = OnnxTextTower(p, device)
        elif (p.is_file() and p.suffix in (".pt", ".pth")) or (p.is_dir() and (p / "student.pt").is_file()):
            raise ClipkdError(f"{model} is a distilled student: it has no text tower; use its teacher for text "
                              "(a student lives in its teacher's space)")
        else:
            model = load_teacher(model, device, precision)
    model.require_text("text embeddings")
    return model


def load_clip(spec: str) -> ClipModel:
    """A trainable CLIP from a spec (fp32, on CPU, train mode, every parameter requiring grad)."""
    model = _build(spec, "cpu", "fp32")
    model.model.train().requires_grad_(True)
    return model
