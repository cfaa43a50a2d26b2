"""Hugging Face ``transformers`` CLIPs: ``hf:ORG/NAME`` (hub id, from the local cache when offline) or
``hf:/path/to/dir`` (a ``save_pretrained`` folder) — ``CLIPModel`` and ``ChineseCLIPModel``, each with its
own image processor and tokenizer. Needs ``pip install 'clipkd[hf]'`` (transformers), imported on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.preprocess import PreprocessConfig
from ..errors import ClipkdError, first_line
from .base import ClipModel, weights_fingerprint
from .registry import register_backend

MODEL_TYPES = {"clip": "CLIPModel", "chinese_clip": "ChineseCLIPModel"}


def _transformers():
    try:
        import transformers

        return transformers
    except ImportError:
        raise ClipkdError("hf: specs need Hugging Face transformers: pip install 'clipkd[hf]'") from None


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` it is (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_hf(name: str) -> tuple[Any, Any, Any]:
    """Model, image processor and tokenizer of ``name`` (a hub id or a local folder), offline-safe."""
    tf = _transformers()
    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    try:
        config = tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if local.is_dir() or name.startswith((".", "/", "~")):
            raise ClipkdError(f"hf:{name}: not a transformers model folder ({first_line(e, 200)})") from None
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ClipkdError(
            f"hf:{name}: model files are not in the Hugging Face cache ({HF_HUB_CACHE}) and cannot be downloaded "
            "here; download the model elsewhere (huggingface-cli download " + name + " --local-dir DIR) and pass "
            "hf:DIR") from None
    if config.model_type not in MODEL_TYPES:
        raise ClipkdError(f"hf:{name} is a '{config.model_type}' model; clipkd reads {sorted(MODEL_TYPES)}")
    cls = getattr(tf, MODEL_TYPES[config.model_type])
    try:
        model = cls.from_pretrained(source)
        processor = tf.AutoImageProcessor.from_pretrained(source)
        tokenizer = tf.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ClipkdError(f"hf:{name}: cannot load its weights, image processor or tokenizer: "
                          f"{first_line(e, 300)}") from None
    return model.float(), processor, tokenizer


class HfPreprocess:
    """PIL image → pixel tensor through the model's own image processor (picklable for loader workers)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HfClipTeacher(ClipModel):
    """A transformers ``CLIPModel`` / ``ChineseCLIPModel``."""

    image_prefixes = ("vision_model.", "visual_projection.")

    def __init__(self, name: str, device: torch.device, precision: str) -> None:
        model, self.processor, self.hf_tokenizer = load_hf(name)
        self.model, self.name, self.device, self.precision = model.to(device), name, device, precision
        self.preprocess = HfPreprocess(self.processor)
        self.identity = spec_identity(name)
        self.embed_dim = int(model.config.projection_dim)
        self.logit_scale = float(model.logit_scale.exp().item())
        p = self.processor
        size = p.crop_size if getattr(p, "do_center_crop", False) else p.size
        side = size.get("height") or size.get("shortest_edge")
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(getattr(p, "resample", 3)), "bicubic")
        self.preprocess_cfg = PreprocessConfig(size=(side, side), mean=tuple(p.image_mean), std=tuple(p.image_std),
                                               interpolation=resample, crop=bool(getattr(p, "do_center_crop", True)),
                                               processor=type(p).__name__)
        self.language = "en" if type(model).__name__ == "CLIPModel" else "multi"
        self.unk_id = self.hf_tokenizer.unk_token_id if self.language == "multi" else None
        self.context_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return self.hf_tokenizer(list(texts), padding="max_length", truncation=True,
                                 max_length=min(self.context_length, 77), return_tensors="pt")["input_ids"]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=images))

    def text_features(self, tokens: Any) -> torch.Tensor:
        # CLIP's text transformer is causal, so padding after the end token cannot change its output (and its
        # pad id may equal the end id); BERT-style Chinese-CLIP needs the padding masked.
        pad = self.hf_tokenizer.pad_token_id
        mask = (tokens != pad).long() if self.language == "multi" and pad is not None else None
        return _features(self.model.get_text_features(input_ids=tokens, attention_mask=mask))

    def save(self, out_dir: str | Path) -> str:
        """``out_dir/hf_model/`` via ``save_pretrained`` (model, image processor, tokenizer)."""
        path = (Path(out_dir) / "hf_model").resolve()  # the spec works from any working directory
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        self.hf_tokenizer.save_pretrained(path)
        return f"hf:{path}"


def spec_identity(name: str) -> str:
    """The identity of ``hf:NAME``: a local model folder adds the fingerprint of its first weights file."""
    local = Path(name).expanduser()
    weights = sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")) if local.is_dir() else []
    return f"hf:{name}" + (f"#{weights_fingerprint(weights[0])}" if weights else "")


@register_backend("hf", identity=spec_identity)
def _load(rest: str, device: torch.device, precision: str) -> ClipModel:
    return HfClipTeacher(rest, device, precision)
