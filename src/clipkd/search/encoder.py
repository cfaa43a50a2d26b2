"""What a search index embeds with: any model clipkd can embed images with, plus a text tower when there is one.

A ``clip-train`` run or a teacher spec brings its own text tower. A distilled timm student lives in its teacher's
embedding space, so the teacher's text tower (``text_model``) searches the student's index: text search at student
cost for the images, one text forward per query. The loading itself is :mod:`clipkd.models`'.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipkdError
from ..models import ImageModel, is_student, load_image_model, with_text

Encoder = ImageModel  # the name the index and the service use

__all__ = ["Encoder", "is_student", "load_encoder"]


def load_encoder(model: str | Path, text_model: str | Path | None = None, device: str | None = "auto",
                 precision: str = "auto") -> Encoder:
    """An :class:`~clipkd.models.ImageModel` for a teacher spec, a ``clip-train`` run folder, or a distilled student.

    ``text_model``: for a student, the teacher (spec, clip-train run or exported text tower) whose text tower shares
    its space — refused unless its identity is the one the student was distilled from.
    """
    if text_model is not None and not is_student(model):
        raise ClipkdError(f"{model} is a CLIP with its own text tower; `text_model` is for distilled students")
    enc = load_image_model(model, device, precision)
    if enc.kind == "classifier":
        raise ClipkdError(f"{model} is a classifier (the supervised baseline); search needs an embedding student")
    return with_text(enc, text_model, device, precision)
