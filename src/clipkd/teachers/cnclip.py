"""Chinese-CLIP teachers and students: ``cn_clip:MODEL`` (published weights), ``cn_clip:MODEL@/path/ckpt.pt``,
``cn_clip:MODEL@random`` (random init, for fine-tuning from scratch and for tests).

Besides Chinese-CLIP's published architectures, clipkd ships two of its own (``model_configs/cn_clip``), small
enough to train on a CPU: ``clipkd-tiny-zh`` (a ModifiedResNet of width 24 at 32 px with a 2-layer Chinese BERT: the
benchmarks' Chinese teacher) and ``clipkd-micro-zh`` (width 8, a 64-wide BERT: a student). Both read Chinese-CLIP's
word-piece vocabulary; they have no published weights (``@random`` or a file).

Needs the ``cn_clip`` package (``pip install 'clipkd[cnclip]'``), imported only when a ``cn_clip:`` spec is used.
Checkpoints are Chinese-CLIP's own: a dict with ``state_dict`` (keys may carry DDP's ``module.`` prefix).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig
from ..errors import ClipkdError, first_line
from ..fileio import write_torch
from .base import ClipModel, weights_fingerprint
from .registry import register_backend

CONTEXT_LENGTH = 52  # Chinese-CLIP's text length for all its released models
OWN_CONFIGS = Path(__file__).parent / "model_configs" / "cn_clip"  # clipkd's own Chinese-CLIP architectures


def _cn_clip():
    try:
        import cn_clip.clip as cn

        return cn
    except ImportError:
        raise ClipkdError("cn_clip: specs need the Chinese-CLIP package: pip install 'clipkd[cnclip]' "
                          "(or pip install cn_clip)") from None


def model_info(name: str) -> tuple[dict[str, Any], int]:
    """The architecture kwargs of Chinese-CLIP model ``name`` (from cn_clip's own config files) and its input size."""
    cn = _cn_clip()
    from cn_clip.clip import utils

    own = OWN_CONFIGS / f"{name}.json"
    if own.is_file():
        info = json.loads(own.read_text())
        return info, info.pop("input_resolution")
    if name not in utils._MODEL_INFO:
        mine = sorted(p.stem for p in OWN_CONFIGS.glob("*.json"))
        raise ClipkdError(f"Chinese-CLIP has no model '{name}'; choose from {cn.available_models() + mine}")
    struct, size = utils._MODEL_INFO[name]["struct"], utils._MODEL_INFO[name]["input_resolution"]
    vision, text = struct.split("@")
    configs = Path(utils.__file__).parent / "model_configs"
    info = json.loads((configs / f"{vision}.json").read_text())
    info.update(json.loads((configs / f"{text}.json").read_text()))
    if isinstance(info["vision_layers"], str):
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info, size


def default_checkpoint(name: str) -> Path:
    """Where ``cn_clip.clip.load_from_name`` keeps the published weights of ``name``."""
    from cn_clip.clip import utils

    return Path(os.path.expanduser("~/.cache/clip")) / utils._MODELS[name][1]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A Chinese-CLIP checkpoint's weights, DDP ``module.`` prefixes removed."""
    from ..fileio import check_torch_file

    check_torch_file(path, "Chinese-CLIP checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ClipkdError(f"cannot read Chinese-CLIP checkpoint {path}: {type(e).__name__}: {e}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ClipkdError(f"{path} is not a Chinese-CLIP checkpoint (expected a dict with 'state_dict')")
    return {k.removeprefix("module."): v for k, v in sd.items() if "bert.pooler" not in k}


def create_cnclip(name: str, weights: str | None, device: torch.device | str = "cpu"):
    """Build Chinese-CLIP ``name`` (fp32) with ``weights`` (None: published, ``random``, or a file)."""
    cn = _cn_clip()
    from cn_clip.clip.model import CLIP

    info, size = model_info(name)
    with contextlib.redirect_stdout(io.StringIO()):
        model = CLIP(**info)
    if weights is None and (OWN_CONFIGS / f"{name}.json").is_file():
        raise ClipkdError(f"cn_clip:{name} is clipkd's own architecture, with no published weights: "
                          f"cn_clip:{name}@random (to train) or cn_clip:{name}@FILE")
    if weights != "random":
        path = Path(weights).expanduser() if weights else default_checkpoint(name)
        if not path.is_file():
            if weights:
                raise ClipkdError(f"Chinese-CLIP {name}: checkpoint file not found: {path}")
            raise ClipkdError(
                f"Chinese-CLIP {name}: published weights are not in {path.parent} and cannot be downloaded here; "
                f"download {path.name} (Hugging Face OFA-Sys/{cn.utils._MODELS[name][0]}) elsewhere and pass "
                f"cn_clip:{name}@/path/to/{path.name}")
        sd = read_state_dict(path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = first_line(e, 200)
            raise ClipkdError(f"checkpoint {path} does not fit Chinese-CLIP {name}: {first}") from None
    model = model.float().to(device)
    preprocess = cn.image_transform(size)

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return cn.tokenize(list(texts), context_length=CONTEXT_LENGTH)

    return model, preprocess, tokenizer, size


class CnClipTeacher(ClipModel):
    """A Chinese-CLIP model (Chinese word-piece tokenizer) as a teacher or a fine-tuned student."""

    def __init__(self, name: str, weights: str | None, device: torch.device, precision: str) -> None:
        self.model, self.preprocess, self.tokenizer, size = create_cnclip(name, weights, device)
        self.train_preprocess = self.preprocess  # Chinese-CLIP fine-tunes without augmentation by default
        self.name, self.device, self.precision = name, device, precision
        self.identity = spec_identity(name, weights)
        self.embed_dim = int(self.model.text_projection.shape[1])
        self.preprocess_cfg = PreprocessConfig(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD,
                                               interpolation="bicubic", resize_mode="squash", crop=False)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.language = "multi"
        self.unk_id = _cn_clip()._tokenizer.vocab["[UNK]"]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def text_features(self, tokens: Any) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def save(self, out_dir: str | Path) -> str:
        """``out_dir/cn_clip_model.pt`` in Chinese-CLIP's checkpoint layout (``{"state_dict": ...}``)."""
        path = (Path(out_dir) / "cn_clip_model.pt").resolve()  # the spec works from any working directory
        write_torch(path, {"name": self.name,
                           "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}})
        return f"cn_clip:{self.name}@{path}"


def spec_identity(name: str, weights: str | None) -> str:
    """The identity of ``cn_clip:MODEL@WEIGHTS``: a checkpoint file is named by its name and content fingerprint."""
    if weights and weights != "random":
        p = Path(weights).expanduser()
        return f"cn_clip:{name}@{p.name}#{weights_fingerprint(p) if p.is_file() else 'missing'}"
    return f"cn_clip:{name}@{weights or 'published'}"


def _identity(rest: str) -> str:
    name, _, weights = rest.partition("@")
    return spec_identity(name, weights or None)


@register_backend("cn_clip", identity=_identity)
def _load(rest: str, device: torch.device, precision: str) -> ClipModel:
    name, _, weights = rest.partition("@")
    return CnClipTeacher(name, weights or None, device, precision)
