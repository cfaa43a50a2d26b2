"""OpenCLIP teachers: ``open_clip:MODEL@TAG``, ``open_clip:MODEL@/path/to/ckpt``, ``open_clip:hf-hub:ORG/REPO``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch

from ..data.preprocess import PreprocessConfig
from ..errors import ClipkdError, first_line
from ..fileio import write_torch
from .base import ClipModel, weights_fingerprint
from .registry import register_backend

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)  # clipkd's own small architectures (e.g. clipkd-tiny)


def parse_spec(rest: str) -> tuple[str, str | None]:
    """``MODEL@PRETRAINED`` → (model, pretrained); ``hf-hub:...`` names carry their own weights."""
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    model, _, pretrained = rest.partition("@")
    if not model:
        raise ClipkdError(f"open_clip spec needs a model name: 'open_clip:MODEL@PRETRAINED', got '{rest}'")
    return model, None if pretrained in ("", "random") else pretrained


def preprocess_description(model: torch.nn.Module) -> PreprocessConfig:
    """The preprocessing that open_clip attached to the model (its ``PreprocessCfg``), as clipkd's typed value."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    cfg.setdefault("size", getattr(model.visual, "image_size", None))
    return PreprocessConfig.from_dict(cfg)


def create_openclip(model_name: str, pretrained: str | None, device: torch.device | str = "cpu"):
    """Create an open_clip model, its train and eval preprocessing and tokenizer; failures are one-line errors."""
    if not model_name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        raise ClipkdError(
            f"open_clip has no model '{model_name}'; see open_clip.list_models() (e.g. ViT-B-32, clipkd-tiny)"
        )
    is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
    if pretrained and not is_file:
        known = [t for m, t in open_clip.list_pretrained() if m == model_name]
        if pretrained not in known:
            looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
            what = "checkpoint file not found" if looks_like_path else "unknown pretrained tag"
            raise ClipkdError(
                f"open_clip {model_name}: {what} '{pretrained}'; tags for it: {known or 'none'}"
            )
    pretrained_arg = str(Path(pretrained).expanduser()) if is_file else pretrained
    if is_file:
        from ..fileio import check_torch_file

        check_torch_file(pretrained_arg, f"open_clip {model_name} checkpoint")
    try:
        model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained_arg, device=device
        )
    except Exception as e:  # noqa: BLE001 - any failure to build or read the weights is a one-line error
        msg = first_line(e)
        if is_file:
            raise ClipkdError(
                f"checkpoint {pretrained} does not fit open_clip model {model_name}: {msg}"
            ) from None
        raise ClipkdError(
            f"could not load weights for open_clip {model_name}@{pretrained}: {msg}. They are neither in the "
            "Hugging Face cache (HF_HOME / ~/.cache/huggingface) nor reachable; download them elsewhere and "
            f"pass the file instead: open_clip:{model_name}@/path/to/open_clip_pytorch_model.bin"
        ) from None
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess_train, preprocess, tokenizer


def causal_prefix_ok(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text tower gives the same features from a prefix of its tokens: open_clip's ``CLIP``
    text transformer with a causal mask and end-of-text pooling (each position attends only to earlier ones, and
    the pooled position is the end token), so positions after the longest text's end cannot change any result."""
    return (all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
            and getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", "") == "argmax")


def used_length(tokens: torch.Tensor) -> int:
    """The columns a batch of open_clip tokens uses: up to its longest text's end token (padding is 0)."""
    used = torch.nonzero(tokens.ne(0).any(0))
    return max(int(used[-1]) + 1, 1) if len(used) else 1


def prefix_text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` over ``tokens`` of any length up to the context: the positional embedding
    and causal mask cut to that length (a model for which :func:`causal_prefix_ok` holds)."""
    n = tokens.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


class OpenClipTeacher(ClipModel):
    """An open_clip CLIP model as a teacher."""

    def __init__(self, model_name: str, pretrained: str | None, device: torch.device, precision: str):
        self.model, self.train_preprocess, self.preprocess, self.tokenizer = create_openclip(
            model_name, pretrained, device)
        self.model_name, self.device, self.precision = model_name, device, precision
        self.language = "en" if isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer) else "multi"
        self.identity = spec_identity(model_name, pretrained)
        self.embed_dim = int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") \
            and self.model.text_projection is not None else int(self.model.visual.output_dim)
        self.preprocess_cfg = preprocess_description(self.model)
        self.logit_scale = float(self.model.logit_scale.exp().item())

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def text_features(self, tokens: Any) -> torch.Tensor:
        """Raw text features; a causal tower runs only up to the batch's longest text (:func:`used_length`)."""
        if not self.text_causal:
            return self.model.encode_text(tokens)
        return prefix_text_features(self.model, tokens[:, : used_length(tokens)])

    @property
    def text_causal(self) -> bool:
        return causal_prefix_ok(self.model)

    def text_prefix_features(self, tokens: Any) -> torch.Tensor:
        return prefix_text_features(self.model, tokens) if self.text_causal else self.model.encode_text(tokens)

    def save(self, out_dir: str | Path) -> str:
        """``out_dir/open_clip_model.pt`` (a plain state dict, as open_clip loads it)."""
        path = (Path(out_dir) / "open_clip_model.pt").resolve()  # the spec works from any working directory
        write_torch(path, {k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        return f"open_clip:{self.model_name}@{path}"


def _no_weights(rest: str) -> bool:
    """``MODEL`` or ``MODEL@``: no tag, no file, no explicit ``@random`` (``hf-hub:``/``local-dir:`` carry weights)."""
    return not rest.startswith(("hf-hub:", "local-dir:")) and rest.partition("@")[2] == ""


def spec_identity(model_name: str, pretrained: str | None) -> str:
    """The identity of ``open_clip:MODEL@PRETRAINED``: a weights file is named by its name and content fingerprint."""
    if pretrained and Path(pretrained).expanduser().is_file():
        p = Path(pretrained).expanduser()
        return f"open_clip:{model_name}@{p.name}#{weights_fingerprint(p)}"
    return f"open_clip:{model_name}@{pretrained or 'random-init'}"


@register_backend("open_clip", no_weights=_no_weights, identity=lambda rest: spec_identity(*parse_spec(rest)))
def _load(rest: str, device: torch.device, precision: str) -> ClipModel:
    model_name, pretrained = parse_spec(rest)
    return OpenClipTeacher(model_name, pretrained, device, precision)
