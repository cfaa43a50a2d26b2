"""An exported CLIP text tower (``clipkd export --tower text``) as a text-only model, run by ONNX Runtime: a
backend beside the PyTorch CLIPs wherever clipkd needs text only (``embed-text``, an index's ``--text-model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ClipkdError, first_line
from ..onnxfile import onnx_providers, read_metadata


class OnnxTextTower:
    """An exported CLIP text tower (``clipkd export --tower text``): texts → L2-normalised embeddings through ONNX
    Runtime, tokenised by the tokenizer its metadata names. Stands in for the CLIP wherever clipkd needs text only
    (``embed-text``, an index's ``--text-model``): a deployed student plus this file need no PyTorch CLIP."""

    has_text = True

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        meta = read_metadata(self.path)
        tok = meta.get("tokenizer") or {}
        if meta["kind"] != "text_embedding" or tok.get("backend") != "open_clip":
            raise ClipkdError(f"{self.path} is not an exported open_clip text tower (clipkd export --tower text)")
        import open_clip

        from . import openclip  # noqa: F401 - registers clipkd's own architectures with open_clip

        self.meta = meta
        self.tokenizer = open_clip.get_tokenizer(tok["model"])
        self.identity, self.embed_dim = meta["teacher"], int(meta["out_dim"])
        self.logit_scale = float(meta.get("logit_scale", 100.0))
        try:
            self.session = ort.InferenceSession(str(self.path), providers=onnx_providers(device))
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors are long
            raise ClipkdError(f"ONNX Runtime cannot load {self.path}: {first_line(e)}") from None
        self.input_name = self.session.get_inputs()[0].name

    def require_text(self, why: str = "text embeddings") -> None:
        """It always has text (the :class:`~clipkd.teachers.base.ClipModel` interface)."""

    @torch.no_grad()
    def encode_text(self, texts: Any, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised fp32 text embeddings (on CPU)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).long().numpy()
            feats = torch.from_numpy(self.session.run(None, {self.input_name: tokens})[0]).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)
