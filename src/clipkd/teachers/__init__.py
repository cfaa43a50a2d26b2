"""CLIP models behind one interface, named by a spec string (``open_clip:MODEL@PRETRAINED``): frozen teachers
(:func:`load_teacher`) and trainable CLIPs (:func:`load_clip`) over the same backends."""

from .base import ClipModel, Teacher, resolve_device
from .factory import BACKENDS, list_backends, load_clip, load_teacher, load_text_model, register_backend, resolve_model

__all__ = ["BACKENDS", "ClipModel", "Teacher", "list_backends", "load_clip", "load_teacher", "load_text_model",
           "register_backend", "resolve_device", "resolve_model"]
