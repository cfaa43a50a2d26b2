"""The CLIP-model interface every backend implements (used frozen as a teacher, or trained by ``clip-train``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.preprocess import PreprocessConfig
from ..distributed import PRECISIONS
from ..errors import ClipkdError
from ..fileio import weights_fingerprint  # noqa: F401 - the backends import it from here

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; an unavailable CUDA request is an error. In a job of
    several ranks, ``auto``/``cuda`` is the rank's own GPU (``cuda:LOCAL_RANK``)."""
    from ..distributed import local_device

    device = local_device(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClipkdError(f"`device`={device} requested but CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → fp16 on GPU, fp32 on CPU. Half precision on CPU is refused: it is slow there."""
    if precision not in PRECISIONS:
        raise ClipkdError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ClipkdError(f"precision {precision} is only supported on GPU; CPU paths run in fp32")
    return precision


class ClipModel:
    """A CLIP model that embeds images and texts into one space, behind one interface for every backend.

    :func:`~clipkd.teachers.load_teacher` returns one frozen (a teacher: eval mode, no gradients);
    :func:`~clipkd.teachers.load_clip` returns one ready to train (``clip-train``).

    Attributes:
        identity: names the weights exactly; recorded with everything computed from them.
        embed_dim: size of the joint embedding.
        preprocess: PIL image → tensor, as the model expects.
        preprocess_cfg: the typed description of ``preprocess`` (for manifests and exports).
        tokenizer: list of strings → token tensor; ``None`` for image-only models (see ``has_text``).
        model: the underlying ``nn.Module``.
        train_preprocess: the augmentation its own ecosystem fine-tunes with (default: ``preprocess``).
        language: what its tokenizer reads: ``"en"`` (English BPE) or ``"multi"`` (word-piece / multilingual).
    """

    identity: str
    embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    preprocess_cfg: PreprocessConfig
    tokenizer: Callable[[Sequence[str]], Any] | None = None
    model: torch.nn.Module
    device: torch.device
    precision: str = "fp32"
    logit_scale: float = 100.0
    train_preprocess: Callable[[Image.Image], torch.Tensor] | None = None
    language: str = "multi"
    image_prefixes: tuple[str, ...] = ("visual.",)  # parameter names of the image tower (for freezing)
    _compiled: tuple[Callable[[torch.Tensor], torch.Tensor], int] | None = None
    _compiled_checked: bool = False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def to_device(self, device: torch.device | str) -> ClipModel:
        """Move the model to ``device`` (a trainer's rank puts its online teacher beside its student)."""
        device = torch.device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
            self._compiled = None
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backend hook: raw (unnormalised) image features of a preprocessed batch on ``device``."""
        raise NotImplementedError

    def text_features(self, tokens: Any) -> torch.Tensor:
        """Backend hook: raw text features of tokenizer output on ``device``."""
        raise NotImplementedError

    text_causal = False  # whether text_prefix_features gives text_features' result from any prefix of the tokens

    def text_prefix_features(self, tokens: Any) -> torch.Tensor:
        """Raw text features of ``tokens`` cut to any length that keeps every text's end token (what an ONNX text
        tower with a dynamic sequence axis runs); backends with a causal text tower (:attr:`text_causal`) override
        it."""
        return self.text_features(tokens)

    def compile_image_tower(self, batch_size: int) -> None:
        """Run the image tower through ``torch.compile`` for batches of up to ``batch_size`` images.

        Smaller batches are padded to ``batch_size`` so it compiles once. The first compiled batch is
        checked against the eager tower; if compiling fails (e.g. no C++ compiler) or the embeddings
        disagree, a warning is printed and the eager tower is used from then on.
        """
        if self._compiled is None or self._compiled[1] != batch_size:
            self._compiled = (torch.compile(self.image_features, dynamic=False), batch_size)
            self._compiled_checked = False

    @property
    def is_compiled(self) -> bool:
        """Whether the image tower runs compiled (after :meth:`compile_image_tower`, until a fallback to eager)."""
        return self._compiled is not None

    def _image_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None or x.shape[0] > self._compiled[1]:
            return self.image_features(x)
        fn, size = self._compiled
        n = x.shape[0]
        padded = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))]) if n < size else x
        if self._compiled_checked:
            return fn(padded)[:n]
        eager = self.image_features(x)
        try:
            out = fn(padded)[:n]
        except Exception as e:  # inductor needs a working C++ toolchain; never lose a job to it
            return self._drop_compiled(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]})", eager)
        diff = (F.normalize(out.float(), dim=-1) - F.normalize(eager.float(), dim=-1)).abs().max().item()
        if diff > (1e-3 if self.precision == "fp32" else 2e-2):
            return self._drop_compiled(f"compiled image tower disagrees with eager (max diff {diff:.2e})", eager)
        self._compiled_checked = True
        return out

    def _drop_compiled(self, why: str, eager: torch.Tensor) -> torch.Tensor:
        log.warning("%s; using the eager image tower", why)
        self._compiled = None
        return eager

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 image embeddings of a preprocessed batch (returned on the input's device)."""
        src = images.device
        with self._autocast():
            feats = self._image_forward(images.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1).to(src)

    @property
    def has_text(self) -> bool:
        """Whether the model has a text tower clipkd can use (image-only teachers do not)."""
        return self.tokenizer is not None

    def require_text(self, why: str = "text embeddings") -> None:
        """Raise a one-line error when ``why`` needs a text tower this model does not expose."""
        if not self.has_text:
            raise ClipkdError(f"{self.identity} is an image-only model (its text tower is not exposed), so it "
                              f"cannot give {why}; use a CLIP teacher for text")

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised fp32 text embeddings (on CPU)."""
        self.require_text()
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size]))
            tokens = tokens.to(self.device) if hasattr(tokens, "to") else tokens
            with self._autocast():
                out.append(F.normalize(self.text_features(tokens).float(), dim=-1).cpu())
        return torch.cat(out)

    def save(self, out_dir: str | Path) -> str:
        """Save the (fine-tuned) weights as the backend's own checkpoint; return the spec that loads them."""
        raise ClipkdError(f"{type(self).__name__} cannot save fine-tuned weights")

    def describe(self) -> dict[str, Any]:
        """What a store or text-embedding file records about this teacher."""
        return {"teacher": self.identity, "embed_dim": self.embed_dim, "preprocess": self.preprocess_cfg.to_dict()}


Teacher = ClipModel  # the name the backends and older code use
