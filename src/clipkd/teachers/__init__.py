"""Teachers: CLIP models behind one interface, named by a spec string (``open_clip:MODEL@PRETRAINED``)."""

from .base import Teacher, resolve_device
from .factory import list_backends, load_teacher, register_backend

__all__ = ["Teacher", "list_backends", "load_teacher", "register_backend", "resolve_device"]
