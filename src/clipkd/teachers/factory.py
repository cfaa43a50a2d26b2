"""Spec strings → teachers, through a registry of backends (``open_clip``, ...)."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ClipkdError
from .base import Teacher, resolve_device, resolve_precision

_BACKENDS: dict[str, Callable[..., Teacher]] = {}


def register_backend(name: str) -> Callable:
    """Decorator: register ``fn(spec_rest, device, precision) -> Teacher`` under ``name:``."""

    def wrap(fn: Callable[..., Teacher]) -> Callable[..., Teacher]:
        _BACKENDS[name] = fn
        return fn

    return wrap


def list_backends() -> list[str]:
    """Registered backend prefixes."""
    _import_builtin()
    return sorted(_BACKENDS)


def _import_builtin() -> None:
    from . import cnclip, hf, modelscope, openclip  # noqa: F401  (each registers itself)


def load_teacher(spec: str, device: str | None = "auto", precision: str = "auto") -> Teacher:
    """Build a teacher from a spec such as ``open_clip:ViT-B-32@laion2b_s34b_b79k``.

    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...; ``precision``: ``auto`` (fp16 on GPU,
    fp32 on CPU), ``fp32``, ``fp16`` or ``bf16`` (GPU autocast only).
    """
    _import_builtin()
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in _BACKENDS:
        raise ClipkdError(
            f"teacher spec '{spec}' must start with a backend prefix, one of: "
            + ", ".join(f"{b}:" for b in sorted(_BACKENDS))
        )
    dev = resolve_device(device)
    teacher = _BACKENDS[backend](rest, dev, resolve_precision(precision, dev))
    teacher.model.eval().requires_grad_(False)
    return teacher
