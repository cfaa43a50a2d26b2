"""ModelScope teachers of Chinese-CLIP's distillation guide (the second seed): ``modelscope:NAME`` or
``modelscope:/path/to/downloaded/model``. Needs ``pip install 'clipkd[modelscope]'``, imported on use.

The four supported models and the image-feature function each exposes (as Chinese-CLIP's own
``--distillation`` code maps them). They serve as *image* teachers (``embed-images``, and the
``cosine``/``mse`` distillation losses); their text towers are not exposed, so ``embed-text`` and the
``affinity`` loss need another teacher. Images are preprocessed as Chinese-CLIP's training feeds them
(224 px squash, CLIP mean/std).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig
from ..errors import ClipkdError, first_line
from .base import ClipModel
from .registry import register_backend

TEACHERS = {
    "damo/multi-modal_clip-vit-huge-patch14_zh": ("clip_model", "encode_image"),
    "damo/multi-modal_clip-vit-large-patch14_zh": ("clip_model", "encode_image"),
    "damo/multi-modal_team-vit-large-patch14_multi-modal-similarity": ("model", "image_model"),
    "damo/multi-modal_rleg-vit-large-patch14": ("model", "encode_image"),
}

def _model_class():
    try:
        from modelscope.models import Model

        return Model
    except ImportError:
        raise ClipkdError("modelscope: specs need ModelScope: pip install 'clipkd[modelscope]'") from None

def _which(name: str) -> str:
    """The supported model ``name`` refers to (a hub name, or a local folder named after one)."""
    if name in TEACHERS:
        return name
    local = Path(name).expanduser()
    for known in TEACHERS:
        if local.name == known.split("/")[1] or str(local).endswith(known):
            return known
    raise ClipkdError(f"modelscope teacher '{name}' is not one of {sorted(TEACHERS)} (a local folder must keep "
                      "the model's name)")

class ModelScopeTeacher(ClipModel):
    """An image teacher loaded with ``modelscope.models.Model.from_pretrained`` (no text tower: ``tokenizer``
    is ``None``, so ``has_text`` is false and text requests are one-line errors)."""

    def __init__(self, name: str, device: torch.device, precision: str) -> None:

        known = _which(name)
        Model = _model_class()
        try:
            wrapper = Model.from_pretrained(name)
        except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; all mean "not available"
            cache = os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope/hub")
            first = first_line(e, 200)
            raise ClipkdError(f"modelscope:{name}: cannot load it ({first}); it is not in the ModelScope cache "
                              f"({cache}) and cannot be downloaded here: download it elsewhere "
                              f"(modelscope download --model {known} --local_dir DIR) and pass modelscope:DIR"
                              ) from None
        attr, fn = TEACHERS[known]
        inner = getattr(wrapper, attr, None)
        if inner is None or not hasattr(inner, fn):
            raise ClipkdError(f"modelscope:{name}: the loaded model has no {attr}.{fn} (is modelscope up to date?)")
        self.model = wrapper.to(device) if hasattr(wrapper, "to") else inner.to(device)
        self._features = getattr(inner, fn)
        self.identity, self.device, self.precision = f"modelscope:{known}", device, precision
        self.preprocess_cfg = PreprocessConfig(size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resize_mode="squash",
                                               crop=False)
        self.preprocess = self.preprocess_cfg.transform()
        with torch.no_grad():
            probe = self.image_features(torch.zeros(1, 3, 224, 224, device=device))
        self.embed_dim = int(probe.shape[-1])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self._features(images)
        return out[0] if isinstance(out, tuple | list) else out

    def text_features(self, tokens: Any) -> torch.Tensor:
        self.require_text()
        raise AssertionError("unreachable")  # pragma: no cover

@register_backend("modelscope")
def _load(rest: str, device: torch.device, precision: str) -> ClipModel:
    return ModelScopeTeacher(rest, device, precision)
