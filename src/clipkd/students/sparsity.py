"""2:4 structured sparsity (NVIDIA's pattern for sparse tensor cores): in every group of 4 consecutive weights along
a layer's input dimension, at most 2 are non-zero.

:class:`TwoFourSparsity` (a Lightning callback) prunes a student's convolutions and linear layers to the pattern by
magnitude when training starts, and re-applies the masks after every optimizer step, so fine-tuning with the
distillation loss recovers what pruning lost while the pattern stays. Convolutions are grouped along input channels
at each kernel position (the layout NVIDIA's ASP and cuSPARSELt use); layers whose input size is not a multiple of 4
(the 3-channel stem) and grouped/depthwise convolutions stay dense.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch import nn

PATTERN = "2:4"


def _grouped(w: torch.Tensor) -> torch.Tensor:
    """Weights as ``(..., groups of 4)`` along the input dimension (conv: (O, kh, kw, I) → (..., I/4, 4))."""
    if w.ndim == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The layers 2:4 applies to: dense convolutions and linear layers whose input size is a multiple of 4."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0:
            yield name, m
        elif isinstance(m, nn.Linear) and m.in_features % 4 == 0:
            yield name, m


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every group of 4 (a bool mask shaped like ``w``)."""
    g = _grouped(w.detach().abs())
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, g.topk(2, dim=-1).indices, True)
    keep = keep.reshape(*keep.shape[:-2], -1)
    return keep.permute(0, 3, 1, 2).contiguous() if w.ndim == 4 else keep


def is_two_four(w: torch.Tensor) -> bool:
    """Whether every group of 4 input weights has at most 2 non-zeros."""
    return bool(((_grouped(w.detach()) != 0).sum(-1) <= 2).all())


def sparsity_report(model: nn.Module) -> dict[str, float | int | bool]:
    """How much of ``model`` follows the pattern: layers, pruned share of their weights, all layers 2:4."""
    layers = list(prunable(model))
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    params = sum(p.numel() for p in model.parameters())
    return {"layers": len(layers), "zero_share_of_pruned": zeros / max(total, 1), "pruned_share_of_model":
            total / max(params, 1), "two_four": bool(layers) and all(is_two_four(m.weight) for _, m in layers)}


def apply_two_four(model: nn.Module) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place to 2:4 by magnitude; return the masks by layer name."""
    masks = {}
    with torch.no_grad():
        for name, m in prunable(model):
            masks[name] = two_four_mask(m.weight)
            m.weight.mul_(masks[name])
    return masks


class TwoFourSparsity(L.Callback):
    """Prune the trained network (``pl_module.student`` when there is one) to 2:4 at the start of training, and keep
    it so after every optimizer step. A resumed run recomputes the masks from its (already sparse) weights."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}

    @staticmethod
    def _net(pl_module: L.LightningModule) -> nn.Module:
        return getattr(pl_module, "student", pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.masks = apply_two_four(self._net(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        with torch.no_grad():
            for name, m in prunable(self._net(pl_module)):
                m.weight.mul_(self.masks[name].to(m.weight.device))
