"""Reparameterizable micro students for batch-1 CPU latency, registered with timm's model registry.

At small inputs a CPU forward pass costs about as much per operator as per FLOP, so a student with fewer layers is
faster than one with fewer FLOPs. These are RepVGG-style networks (timm's ``ByobNet`` with ``rep`` blocks, the
family MobileCLIP's MobileOne image towers belong to): each block trains as a 3×3 conv + 1×1 conv, each with its
BatchNorm, plus an identity branch (a BatchNorm alone) where the block keeps its channels at stride 1, and folds into
one 3×3 conv for inference (:func:`timm.utils.reparameterize_model`, applied by
:func:`clipkd.students.model.load_student` when a trained student is loaded to be used). They are plain timm
models: ``distill --student clipkd_rep_s`` like any other name.

========================  =====================  ================================  ==========================
name                      blocks (stem, stages)  channels                          folded convs (identities)
========================  =====================  ================================  ==========================
``clipkd_rep_xs``         1, 1-1-1-1             16 → 32 / 64 / 128 / 256          5 (none)
``clipkd_rep_s``          1, 1-2-1-1             24 → 32 / 64 / 128 / 256          6 (stage 2's second block)
``clipkd_rep_m``          1, 1-1-1-1             32 → 48 / 96 / 192 / 384          5 (none)
========================  =====================  ================================  ==========================

The stem and the first block of every stage have stride 2 (a 32-px input ends at 1×1 after the stem and four
stages) and change the channels, so they fold from two branches; only a later block of a stage has an identity.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

from ..data.preprocess import CLIP_MEAN, CLIP_STD


def _cfg(depths: tuple[int, ...], widths: tuple[int, ...], stem: int) -> ByoModelCfg:
    return ByoModelCfg(blocks=tuple(ByoBlockCfg(type="rep", d=d, c=c, s=2) for d, c in zip(depths, widths,
                                                                                          strict=True)),
                       stem_type="rep", stem_chs=stem, stem_pool="")


CONFIGS = {
    "clipkd_rep_xs": _cfg((1, 1, 1, 1), (32, 64, 128, 256), 16),
    "clipkd_rep_s": _cfg((1, 2, 1, 1), (32, 64, 128, 256), 24),
    "clipkd_rep_m": _cfg((1, 1, 1, 1), (48, 96, 192, 384), 32),
}


# timm's registry reads a module's ``default_cfgs`` when it registers a model (no weights: train from scratch)
default_cfgs = generate_default_cfgs({name: {"num_classes": 0, "input_size": (3, 32, 32), "pool_size": (1, 1),
                                             "mean": CLIP_MEAN, "std": CLIP_STD, "first_conv": "stem.conv_kxk.conv",
                                             "classifier": "head.fc", "license": "apache-2.0"}
                                      for name in CONFIGS})


def _create(name: str, pretrained: bool = False, **kwargs) -> ByobNet:
    if pretrained and not (kwargs.get("pretrained_cfg") or kwargs.get("pretrained_cfg_overlay")):
        raise ValueError(f"{name} has no pretrained weights (clipkd's micro students train from scratch; a folder "
                         "`clipkd export --format timm` wrote loads as local-dir:DIR)")
    return build_model_with_cfg(ByobNet, name, pretrained, model_cfg=CONFIGS[name],
                                feature_cfg={"flatten_sequential": True}, **kwargs)


@register_model
def clipkd_rep_xs(pretrained: bool = False, **kwargs) -> ByobNet:
    """RepVGG-style micro student: stem + four single-block stages, 16 → 256 channels."""
    return _create("clipkd_rep_xs", pretrained, **kwargs)


@register_model
def clipkd_rep_s(pretrained: bool = False, **kwargs) -> ByobNet:
    """RepVGG-style micro student: stem + stages of 1-2-1-1 blocks, 24 → 256 channels."""
    return _create("clipkd_rep_s", pretrained, **kwargs)


@register_model
def clipkd_rep_m(pretrained: bool = False, **kwargs) -> ByobNet:
    """RepVGG-style micro student: stem + four single-block stages, 32 → 384 channels."""
    return _create("clipkd_rep_m", pretrained, **kwargs)
