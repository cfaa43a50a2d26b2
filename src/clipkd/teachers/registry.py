"""The registry of CLIP backends (``open_clip:``, ``hf:``, ``cn_clip:``, ``modelscope:``): each backend module
registers its loader here, and :mod:`.factory` looks specs up in it. Its own module, so that the backends and the
factory that imports them form no circle (timm keeps ``_registry.py`` apart from the models that register)."""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .base import ClipModel

BACKENDS: Registry[Callable[..., ClipModel]] = Registry("model backend")


def register_backend(name: str, **meta) -> Callable:
    """Decorator: register ``fn(spec_rest, device, precision) -> ClipModel`` under ``name:``.

    ``meta``: ``no_weights=fn(spec_rest) -> bool`` says a spec names no weights (a teacher refuses it);
    ``identity=fn(spec_rest) -> str`` the identity a loaded model records, computed without loading it.
    """
    return BACKENDS.register(name, **meta)
