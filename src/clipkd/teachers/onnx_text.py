"""An exported CLIP text tower (``clipkd export --tower text``) as a text-only model, run by ONNX Runtime: a
backend beside the PyTorch CLIPs wherever clipkd needs text only (``embed-text``, an index's ``--text-model``)."""

from __future__ import annotations

from typing import Any

import torch

from ..deployed import DeployedText
from ..errors import ClipkdError


class OnnxTextTower(DeployedText):
    """An exported CLIP text tower: texts → L2-normalised torch embeddings through ONNX Runtime (the session and
    tokenizer of :class:`~clipkd.deployed.DeployedText`). Stands in for the CLIP wherever clipkd needs text only
    (``embed-text``, an index's ``--text-model``): a deployed student plus this file need no PyTorch CLIP. A tower
    exported before clipkd embedded its tokenizer is tokenised by the open_clip tokenizer its metadata names."""

    def __init__(self, path: Any, device: Any = None) -> None:
        super().__init__(path, device)
        tok = self.meta.get("tokenizer") or {}
        if self.tokenizer is None:
            if tok.get("backend") != "open_clip":
                raise ClipkdError(f"{self.path} is not an exported open_clip text tower (clipkd export --tower text)")
            import open_clip

            from . import openclip  # noqa: F401 - registers clipkd's own architectures with open_clip

            simple = open_clip.get_tokenizer(tok["model"])
            self.tokenizer = lambda texts: simple(list(texts)).long().numpy()

    @torch.no_grad()
    def encode_text(self, texts: Any, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised fp32 text embeddings (on CPU)."""
        return torch.from_numpy(self.encode_text_np(texts, batch_size))
