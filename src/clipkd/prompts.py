"""Class names → prompts → one template-averaged, L2-normalised text embedding per class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import load_classnames  # noqa: F401  (clipkd.prompts.load_classnames, as before)
from .data.folders import clean_classname
from .errors import ClipkdError
from .fileio import read_json, write_json, write_npz

TEXT_EMB_FORMAT = "clipkd-text/1"
# The templates every command uses for bare class names (embed-text, prompts, eval, source): open_clip's 80 openai
# ones. clipkd's own teachers score the same with any set (benchmarks/results/defaults.md); a pretrained CLIP gains
# from the ensemble (CLIP's paper: +3.5 % ImageNet top-1 over one prompt), so the larger set is the default.
DEFAULT_TEMPLATES = "openai"


def builtin_templates(name: str) -> list[str]:
    """open_clip's zero-shot templates: ``openai`` (80 ImageNet ones) or ``simple`` (7)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    table = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    # open_clip stores templates as callables c -> str; render them with a format placeholder.
    return [t("{}") for t in table[name]]


def load_templates(spec: str) -> list[str]:
    """``openai``, ``simple``, ``none`` (the bare class name) or a file with one ``{}``-template per line."""
    if spec in ("openai", "simple"):
        return builtin_templates(spec)
    if spec == "none":
        return ["{}"]
    path = Path(spec)
    if not path.is_file():
        raise ClipkdError(f"templates must be 'openai', 'simple', 'none' or a file; not found: {spec}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{}" not in ln and "{c}" not in ln]
    if not lines or bad:
        raise ClipkdError(f"template file {spec}: every line needs a '{{}}' placeholder (bad: {bad[:3]})")
    return [ln.replace("{c}", "{}") for ln in lines]


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> dict[str, list[str]]:
    """Every template filled with every class name, keyed by class name (order kept)."""
    if len(set(classnames)) != len(classnames):
        raise ClipkdError("duplicate class names: " + ", ".join(sorted({c for c in classnames
                                                                          if list(classnames).count(c) > 1})))
    return {c: [t.format(c) for t in templates] for c in classnames}


def write_prompts(path: str | Path, prompts: dict[str, list[str]]) -> Path:
    """Write prompts: ``.json`` ({class: [prompts]}) or ``.txt`` (the seed's one prompt per class per line)."""
    path = Path(path)
    if path.suffix == ".txt":
        from .fileio import write_text

        return write_text(path, "".join(p[0] + "\n" for p in prompts.values()))
    return write_json(path, prompts)


def read_prompts(path: str | Path) -> dict[str, list[str]]:
    """Read prompts from ``.json`` ({class: [prompts]}) or a seed-style ``text_prompts.txt``.

    In a ``.txt`` file each line is one class's prompt; the class name is the line with a leading
    "a photo of a" (and a trailing ".") removed, as the seed's prediction script prints it.
    """
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path, "prompts file")
        if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
            raise ClipkdError(f"prompts file {path} must map each class name to a non-empty list of prompts")
        return {str(k): [str(p) for p in v] for k, v in data.items()}
    if not path.is_file():
        raise ClipkdError(f"prompts file not found: {path}")
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        name = line.rstrip(".")
        for prefix in ("a photo of a ", "a photo of an ", "a photo of the ", "a "):
            if name.lower().startswith(prefix):
                name = name[len(prefix):]
                break
        out.setdefault(clean_classname(name), []).append(line)
    if not out:
        raise ClipkdError(f"prompts file {path} is empty")
    return out


@dataclass
class TextEmbeddings:
    """One unit-norm embedding per class, with the class names and the teacher that made them."""

    embeddings: np.ndarray  # (C, D) float32
    classnames: list[str]
    teacher: str
    logit_scale: float = 100.0

    def index(self, names: Sequence[str]) -> list[int]:
        """Positions of ``names``; unknown names are an error."""
        pos = {c: i for i, c in enumerate(self.classnames)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise ClipkdError(f"text embeddings have no class {missing[:5]} (they have {self.classnames[:5]}...)")
        return [pos[n] for n in names]

    def select(self, names: Sequence[str]) -> TextEmbeddings:
        """The embeddings of ``names`` only, in that order."""
        return TextEmbeddings(self.embeddings[self.index(names)], list(names), self.teacher, self.logit_scale)

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` with arrays ``embeddings``, ``classnames``, ``teacher``, ``format``."""
        return write_npz(path, embeddings=self.embeddings.astype(np.float32),
                         classnames=np.array(self.classnames, dtype=str), teacher=np.array(self.teacher),
                         logit_scale=np.array(self.logit_scale, dtype=np.float32),
                         format=np.array(TEXT_EMB_FORMAT))

    @classmethod
    def load(cls, path: str | Path) -> TextEmbeddings:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ClipkdError(f"text-embedding file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z.get("format", "")) != TEXT_EMB_FORMAT:
                    raise ClipkdError(f"{path} is not a clipkd text-embedding file (made by `clipkd embed-text`)")
                return cls(z["embeddings"].astype(np.float32), [str(c) for c in z["classnames"]],
                           str(z["teacher"]), float(z["logit_scale"]))
        except (ValueError, OSError, KeyError) as e:
            raise ClipkdError(f"cannot read text-embedding file {path}: {e}") from None


def embed_prompts(teacher, prompts: dict[str, list[str]]) -> TextEmbeddings:
    """Embed every prompt, average per class (then re-normalise), as CLIP zero-shot classifiers do."""
    flat = [p for ps in prompts.values() for p in ps]
    emb = torch.as_tensor(teacher.encode_text(flat))  # torch from PyTorch models, numpy from deployed ones
    out, start = [], 0
    for ps in prompts.values():
        out.append(F.normalize(emb[start : start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    return TextEmbeddings(torch.stack(out).numpy(), list(prompts), teacher.identity, teacher.logit_scale)


def embed_text(teacher: Any, prompts: str | Path | dict[str, list[str]] | None = None,
               classes: str | Path | None = None, templates: str = DEFAULT_TEMPLATES, device: str = "auto",
               precision: str = "auto", out: str | Path | None = None) -> TextEmbeddings:
    """One text embedding per class from ``prompts`` (a file or a dict) or from ``classes`` + ``templates``.

    ``teacher``: a spec (loaded frozen on ``device``), an exported text tower (``.onnx``), or a loaded model.
    ``out``: also save them there (``.npz``; checked before any model loads).
    """
    if (prompts is None) == (classes is None):
        raise ClipkdError("give exactly one of `prompts` or `classes`")
    if out is not None:
        from .fileio import check_out_file

        check_out_file(out, "text embeddings")
    if prompts is None:
        prompts = build_prompts(load_classnames(classes), load_templates(templates))
    elif not isinstance(prompts, dict):
        prompts = read_prompts(prompts)
    from .teachers import load_text_model

    teacher = load_text_model(teacher, device, precision)  # a spec, a clip-train run, an exported text tower
    teacher.require_text("class text embeddings")
    emb = embed_prompts(teacher, prompts)
    if out is not None:
        emb.save(out)
    return emb


def import_seed_text(prompts_txt: str | Path, embeddings_npy: str | Path, teacher: str,
                     logit_scale: float = 100.0) -> TextEmbeddings:
    """A seed-style ``text_prompts.txt`` (one prompt per class per line) with its (C, D) ``.npy`` of text
    embeddings → :class:`TextEmbeddings` (rows L2-normalised; ``teacher``: the spec of the model that made them,
    recorded as the identity it reports when loaded)."""
    from .teachers.factory import teacher_identity

    teacher = teacher_identity(teacher)
    prompts = read_prompts(prompts_txt)
    try:
        emb = np.load(embeddings_npy).astype(np.float32)
    except (OSError, ValueError) as e:
        raise ClipkdError(f"cannot read text embeddings {embeddings_npy}: {e}") from None
    emb = emb.reshape(emb.shape[0], -1) if emb.ndim > 2 else emb
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ClipkdError(f"{embeddings_npy} has shape {emb.shape}, but {prompts_txt} names {len(prompts)} classes")
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return TextEmbeddings(emb, list(prompts), teacher, logit_scale)
