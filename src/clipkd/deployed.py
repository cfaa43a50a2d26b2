"""Deployed models without PyTorch: an exported image tower (``clipkd export``) and text tower (``--tower text``) run
by ONNX Runtime, with the preprocessing of :meth:`~clipkd.data.preprocess.PreprocessConfig.to_array` (PIL and numpy)
and the BPE tokenizer the text export carries in its metadata (Hugging Face ``tokenizers``, rebuilt from open_clip's
vocabulary at export time and checked against it there).

:class:`~clipkd.search.index.SearchIndex` queries through these when the index was built with an exported
student (and, for text, an exported text tower), so ``clipkd serve`` and ``clipkd search`` over it import neither
torch nor Lightning. The PyTorch side of clipkd (:mod:`clipkd.students.onnx`, :mod:`clipkd.teachers.onnx_text`)
runs the same files through the same sessions and tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data.preprocess import PreprocessConfig
from .errors import ClipkdError
from .fileio import weights_fingerprint
from .onnxfile import TOKENIZER_KEY, open_session

TOKENIZER_FORMAT = "clipkd-bpe/1"
# open_clip's SimpleTokenizer split, after its special tokens (matched with the `regex` module, as open_clip does)
BPE_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class NotDeployable(ClipkdError):
    """The files cannot be served without PyTorch (the reason is the message); the caller may use PyTorch instead."""


def student_identity(arch: str, path: str | Path) -> str:
    """The identity of a student file (``student.pt`` or an export): what its stores and indexes record."""
    path = Path(path)
    return f"student:{arch}@{path.name}#{weights_fingerprint(path)}"


def check_text_space(text_identity: str, space: str, text_model: Any) -> None:
    """Refuse a text model that is not the teacher whose space a student was distilled into."""
    if text_identity != space:
        raise ClipkdError(f"`text_model`={text_model} is '{text_identity}', but the student was distilled from "
                          f"'{space}': its text would land in another space")


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def used_length(tokens: np.ndarray) -> int:
    """The columns a batch of CLIP tokens uses: up to its longest text's end token (padding is 0)."""
    used = np.flatnonzero(np.asarray(tokens).any(0))
    return int(used[-1]) + 1 if len(used) else 1


def clean_text(text: str) -> str:
    """open_clip's ``clean="lower"``: ftfy, HTML entities (twice), whitespace runs → one space, lower case."""
    import html

    try:
        import ftfy
    except ImportError:
        raise ClipkdError("text queries need ftfy (pip install ftfy), as open_clip's tokenizer does") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def bpe_tokenizer_spec(tokenizer: Any, context_length: int) -> dict[str, Any] | None:
    """open_clip's ``SimpleTokenizer`` for an export's metadata: its split pattern and special ids, and its byte-level
    BPE as a ``tokenizers`` JSON; ``None`` when ``tokenizer`` is another kind (a Hugging Face one, another cleaning or
    a reduction mask, or no ``tokenizers`` package here), which then needs open_clip to run."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return None

    if type(tokenizer).__name__ != "SimpleTokenizer" or getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    if getattr(getattr(tokenizer, "clean_fn", None), "__name__", "") != "_clean_lower":
        return None
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    bpe = Tokenizer(models.BPE(vocab=dict(tokenizer.encoder), merges=merges, end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # each piece, whole
    specials = {tokenizer.decoder[i]: int(i) for i in tokenizer.all_special_ids}
    pattern = "|".join([*specials, BPE_SPLIT])
    return {"format": TOKENIZER_FORMAT, "context_length": int(context_length), "sot": int(tokenizer.sot_token_id),
            "eot": int(tokenizer.eot_token_id), "clean": "lower", "pattern": pattern, "specials": specials,
            "tokenizer": bpe.to_str()}


class BpeTokenizer:
    """Texts → ``(n, context)`` int64 token ids exactly as open_clip's ``SimpleTokenizer`` makes them: the same
    cleaning, the same split (its pattern, by the same ``regex`` module), special tokens typed as text kept whole,
    each other piece byte-level BPE'd by ``tokenizers``; start and end tokens, truncated with the end token kept, zero
    padding. Built from :func:`bpe_tokenizer_spec`'s record."""

    def __init__(self, spec: dict[str, Any]) -> None:
        try:
            import regex
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ClipkdError(f"text queries need the {e.name} package (pip install {e.name})") from None
        if spec.get("format") != TOKENIZER_FORMAT or spec.get("clean") != "lower":
            raise NotDeployable(f"the text tower's tokenizer is not a {TOKENIZER_FORMAT} one")
        self.bpe = Tokenizer.from_str(spec["tokenizer"])
        self.split = regex.compile(spec["pattern"], regex.IGNORECASE)
        self.specials = {str(k): int(v) for k, v in spec["specials"].items()}
        self.context, self.sot, self.eot = int(spec["context_length"]), int(spec["sot"]), int(spec["eot"])

    def encode(self, text: str) -> list[int]:
        """One text's ids, without the start and end tokens."""
        ids: list[int] = []
        words: list[str] = []
        for piece in [*self.split.findall(clean_text(text)), None]:
            if piece is None or piece in self.specials:
                if words:
                    ids += self.bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids
                    words = []
                if piece is not None:
                    ids.append(self.specials[piece])
            else:
                words.append(piece)
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context:
                ids = ids[: self.context]
                ids[-1] = self.eot
            out[i, : len(ids)] = ids
        return out


class DeployedText:
    """An exported text tower: texts → unit vectors (numpy), ``identity`` the CLIP it came from."""

    has_text = True

    def __init__(self, path: str | Path, device: Any = None) -> None:
        self.path = Path(path)
        self.session, self.meta, props = open_session(self.path, device, spin=True)
        if self.meta["kind"] != "text_embedding":
            raise ClipkdError(f"{self.path} is not an exported open_clip text tower (clipkd export --tower text)")
        self.identity, self.embed_dim = self.meta["teacher"], int(self.meta["out_dim"])
        self.logit_scale = float(self.meta.get("logit_scale", 100.0))
        self.input_name = self.session.get_inputs()[0].name
        # a tower exported with a dynamic sequence axis runs only up to the longest text's end token (it is causal:
        # later positions cannot change the result); older exports take the whole context
        self.cut = isinstance(self.session.get_inputs()[0].shape[1], str)
        spec = props.get(TOKENIZER_KEY)
        self.tokenizer: Any = BpeTokenizer(json.loads(spec)) if spec else None

    def require_text(self, why: str = "text embeddings") -> None:
        """It always has text (the :class:`~clipkd.teachers.base.ClipModel` interface)."""

    def require_tokenizer(self) -> None:
        """:class:`NotDeployable` when the file carries no tokenizer (then tokenising it needs open_clip)."""
        if self.tokenizer is None:
            raise NotDeployable(f"{self.path} carries no tokenizer (exported before clipkd embedded one): re-export "
                                "it with `clipkd export --tower text`")

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        self.require_tokenizer()
        tokens = self.tokenizer(texts)
        return tokens[:, : used_length(tokens)] if self.cut else tokens

    def encode_text_np(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [_normalize(self.session.run(None, {self.input_name: self.tokens(texts[i : i + batch_size])})[0])
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    encode_text = encode_text_np


class DeployedImage:
    """An exported image tower as the search index's model: ``identity`` (the same as its PyTorch loader gives),
    ``preprocess`` (PIL → array), ``encode_batch`` (preprocessed arrays → unit vectors), and a text tower if set."""

    runtime = "onnx"

    def __init__(self, path: str | Path, device: Any = None) -> None:
        self.path = Path(path)
        self.session, self.meta, _ = open_session(self.path, device)
        if self.meta["kind"] == "text_embedding":
            raise ClipkdError(f"{self.path} is an exported text tower: use it for text (embed-text --teacher, "
                              "index build --text-model), not as an image model")
        self.kind = "student" if self.meta["kind"] == "embedding" else "classifier"
        self.preprocess_cfg = PreprocessConfig.from_dict(self.meta["preprocess"])
        if self.preprocess_cfg.processor:
            raise NotDeployable(f"{self.path} needs its backend's own image processor "
                                f"({self.preprocess_cfg.processor})")
        self.preprocess_cfg.check()
        self.identity = student_identity(self.meta.get("arch", "onnx"), self.path)
        self.embed_dim = int(self.meta["out_dim"])
        self.space = self.meta.get("teacher", "")
        self.source = self.spec = str(path)
        self.input_name = self.session.get_inputs()[0].name
        self.text: DeployedText | None = None

    def preprocess(self, img: Any) -> np.ndarray:
        return self.preprocess_cfg.to_array(img)

    def encode_batch(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """Unit embeddings of preprocessed images (:meth:`preprocess`), one forward for the batch."""
        x = np.ascontiguousarray(np.stack(list(items)), dtype=np.float32)
        return _normalize(self.session.run(None, {self.input_name: x})[0])

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def logit_scale(self) -> float:
        return self.text.logit_scale if self.text is not None else 100.0

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if self.text is None:
            raise ClipkdError(f"{self.identity} has no text tower for text queries (a distilled student: pass "
                              "`text_model` with its teacher's spec or exported text tower)")
        return self.text.encode_text_np(list(texts))


def load_deployed(model: str | Path, text_model: str | Path | None = None, device: Any = None) -> DeployedImage:
    """An exported image tower (and text tower) for queries without PyTorch; :class:`NotDeployable` when the pair
    needs it (a text model that is not an exported tower, a tower exported without its tokenizer, a backend's own
    image processor)."""
    if Path(model).suffix != ".onnx":  # a missing .onnx file is an error below, not a reason to try PyTorch
        raise NotDeployable(f"{model} is not an exported .onnx image tower")
    if text_model is not None and Path(text_model).suffix != ".onnx":
        raise NotDeployable(f"the text model {text_model} is not an exported .onnx text tower")
    image = DeployedImage(model, device)
    if image.kind == "classifier":
        raise ClipkdError(f"{model} is a classifier (the supervised baseline); search needs an embedding student")
    if text_model is not None:
        text = DeployedText(text_model, device)
        text.require_tokenizer()
        check_text_space(text.identity, image.space, text_model)
        image.text = text
    return image
