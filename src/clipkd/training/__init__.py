"""Training: one Lightning loop (:func:`fit`) behind distillation, the baseline and CLIP training."""

from .trainer import fit

__all__ = ["fit"]
