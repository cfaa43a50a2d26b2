"""``clipkd export``: any model clipkd makes or loads → a self-describing ONNX file (or a TensorRT engine).

The ONNX file has one input ``image`` (float32, ``(batch, 3, H, W)``, dynamic batch) and one output (``embedding``
or ``logits``), a fixed opset (:data:`OPSET`), and clipkd's metadata (:mod:`clipkd.students.onnx`): output kind,
teacher identity, class names, preprocessing. A CLIP's text tower (``tower="text"``) exports the same way with
input ``tokens`` (int64, ``(batch, context)``) and output ``text_embedding``; its metadata carries the tokenizer
(open_clip's BPE rebuilt with Hugging Face ``tokenizers``, checked id for id at export; other tokenizers are named and
rebuilt from open_clip), so text travels without PyTorch weights, and without PyTorch at all (:mod:`clipkd.deployed`).
Export ends with ``onnx.checker`` and a parity check on real sample
images against the PyTorch model (fp32: cosine ≥ :data:`PARITY_MIN` on every sample, else an error and no file).
``int8=True`` then quantizes it (ONNX Runtime static quantization, QDQ, per-channel weights) with calibration
images; its parity is reported, its accuracy is what ``clipkd eval`` of the file measures.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ClipkdError, first_line
from ..fileio import check_out_file
from ..onnxfile import TOKENIZER_KEY
from ..students.onnx import save_onnx_atomic, set_metadata, student_metadata
from .common import PARITY_MIN, TOWERS, ExportResult, batch_images, default_images, portable_name, sample_images

log = logging.getLogger(__name__)

OPSET = 18
MIN_CALIBRATION = 16


class _ImageTower(nn.Module):
    """A CLIP's image tower as a module (raw features, as ``ClipModel.image_features`` gives them)."""

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip
        self.inner = clip.model  # registered, so .eval() and parameters reach it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(x)


class _TextTower(nn.Module):
    """A CLIP's text tower as a module: token ids → raw text features (``ClipModel.text_features``)."""

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip
        self.inner = clip.model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.text_prefix_features(tokens)


# parity samples for a text tower when the user gives none: prompts of the kinds clipkd embeds
SAMPLE_TEXTS = ("a photo of a dog.", "a photo of a red circle.", "a blurry photo of a handwritten 7.",
                "an origami crane.", "a close-up photo of a sneaker.", "a cat sitting on a laptop keyboard",
                "two people riding bicycles in the rain", "a bowl of ramen with an egg", "a red car.",
                "the number four, drawn in green ink.", "a picture of a mountain lake at sunrise", "a tabby cat.",
                "an x-ray of a hand", "a satellite image of farmland", "a drawing of a yo-yo.", "一只猫的照片")


def _text_source(model: str | Path) -> tuple[nn.Module, dict[str, Any], Any]:
    """A CLIP's text tower, its metadata, and its tokenizer."""
    from ..models import is_student, load_image_model

    if is_student(model):
        raise ClipkdError(f"{model} is a distilled student: it has no text tower; export its teacher's with "
                          "`tower`=text (a student's space is its teacher's)")
    try:
        clip = load_image_model(model, device="cpu", precision="fp32").clip
    except ClipkdError as e:
        raise ClipkdError(f"cannot export '{model}': not a clip-train run or teacher spec ({e})") from None
    clip.require_text("a text tower to export")
    if not clip.identity.startswith("open_clip:") or not hasattr(clip, "model_name"):
        raise ClipkdError(f"`tower`=text exports open_clip models (their tokenizer is rebuilt from open_clip's); "
                          f"{clip.identity}'s tokenizer cannot travel with the ONNX file")
    context = int(clip.tokenizer(["x"]).shape[1])
    meta = {"kind": "text_embedding", "arch": clip.identity.split("@")[0], "out_dim": clip.embed_dim,
            "teacher": clip.identity, "classnames": [], "preprocess": None, "logit_scale": clip.logit_scale,
            "tokenizer": {"backend": "open_clip", "model": clip.model_name, "context_length": context},
            "source": portable_name(model)}
    return _TextTower(clip).eval(), meta, clip.tokenizer


def _source(model: str | Path) -> tuple[nn.Module, dict[str, Any], Any]:
    """The PyTorch module to export, its metadata, and its image transform."""
    from ..models import is_student, load_image_model

    if is_student(model) and Path(model).suffix == ".onnx":
        raise ClipkdError(f"{model} is already an ONNX export; export the student.pt it came from")
    try:
        m = load_image_model(model, device="cpu", precision="fp32")
    except ClipkdError as e:
        if is_student(model):
            raise
        raise ClipkdError(f"cannot export '{model}': not a clipkd student, clip-train run or teacher spec ({e})") \
            from None
    if m.student is not None:
        student = m.student.float().eval()
        meta = student_metadata(student.cfg, portable_name(model))
        from ..students.sparsity import PATTERN, sparsity_report

        if sparsity_report(student)["two_four"]:
            meta["sparsity"] = PATTERN  # TensorRT builds such a model with its sparse tactics
        return student, meta, m.preprocess
    clip = m.clip
    tower = _ImageTower(clip).eval()
    meta = {"kind": "embedding", "arch": clip.identity.split("@")[0], "out_dim": clip.embed_dim,
            "teacher": clip.identity, "classnames": [], "preprocess": clip.preprocess_cfg.to_dict(),
            "source": portable_name(model)}
    return tower, meta, clip.preprocess


def _write_onnx(module: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any],
                extra: dict[str, str] | None = None, seq: bool = False) -> None:
    """torch.onnx (the dynamo exporter; the TorchScript one when it fails) → ``out``, with the metadata (and
    ``extra`` metadata properties). ``seq``: the second axis (a text tower's tokens) takes any length up to the
    example's too; the metadata's ``input_shape`` says whether the graph kept it dynamic."""
    import onnx

    output = {"classifier": "logits", "text_embedding": "text_embedding"}.get(meta["kind"], "embedding")
    name = meta.get("input", "image")
    # an example batch of one lets the exporter specialise the batch axis to 1 (open_clip's ViTs): trace with two
    example = example[:2] if len(example) >= 2 else torch.cat([example, example])
    with tempfile.TemporaryDirectory(prefix="clipkd-export-") as tmp:  # not beside `out`: a kill leaves no litter
        raw = Path(tmp) / "raw.onnx"
        try:
            axes = {0: torch.export.Dim("batch", min=1, max=4096)}
            if seq:
                axes[1] = torch.export.Dim("seq", min=1, max=int(example.shape[1]))
            torch.onnx.export(module, (example,), str(raw), input_names=[name], output_names=[output],
                              dynamic_shapes=(axes,), opset_version=OPSET, dynamo=True, external_data=False,
                              verbose=False)
            meta["exporter"] = "dynamo"
        except Exception as e:  # noqa: BLE001 - fall back to the TorchScript exporter, which covers more modules
            log.info("dynamo export failed (%s); using the TorchScript exporter", first_line(e))
            torch.onnx.export(module, (example,), str(raw), input_names=[name], output_names=[output],
                              dynamic_axes={name: {0: "batch", 1: "seq"} if seq else {0: "batch"},
                                            output: {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
            meta["exporter"] = "torchscript"
        m = onnx.load(str(raw))
        batch = m.graph.input[0].type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise ClipkdError(f"the exported graph of {meta.get('identity', 'the model')} fixes its batch axis at "
                              f"{batch.dim_value}; clipkd's ONNX files take any batch (please report this model)")
        if seq and m.graph.input[0].type.tensor_type.shape.dim[1].dim_param:
            meta["input_shape"] = ["batch", "seq"]  # readers cut their tokens to the longest text's end
        set_metadata(m, meta, extra)
        onnx.checker.check_model(m, full_check=True)
        save_onnx_atomic(m, out)


def _parity(path: Path, reference: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        feed = batch.numpy() if batch.dtype == torch.int64 else np.ascontiguousarray(batch.float().numpy())
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: feed})[0]).float()

    cos = torch.nn.functional.cosine_similarity(run(x), reference.float(), dim=-1)
    if len(x) > 1:  # the file takes a batch of one as well as the whole sample batch
        cos = torch.cat([cos, torch.nn.functional.cosine_similarity(run(x[:1]), reference[:1].float(), dim=-1)])
    return float(cos.min()), float(cos.mean())


def export_onnx(model: str | Path, out: Path, format: str = "onnx", images: str | Path | None = None,
                samples: int = 16, int8: bool = False, calib: str | Path | None = None, calib_count: int = 128,
                fp16: bool = True, tower: str = "image") -> ExportResult:
    """The ONNX (or TensorRT) export of :func:`clipkd.export.export_model`, its arguments checked before any work."""
    if format == "tensorrt":
        from .tensorrt import check_tensorrt

        check_tensorrt()
    if format == "onnx" and out.suffix != ".onnx":
        raise ClipkdError(f"`out` of an ONNX export must end in .onnx, got {out}")
    if out.is_dir():
        raise ClipkdError(f"`out`={out} is a folder; give a file name")
    check_out_file(out, "export")
    if samples < 1:
        raise ClipkdError(f"`samples` must be ≥ 1, got {samples}")
    if tower not in TOWERS:
        raise ClipkdError(f"unknown `tower` '{tower}' (image, text)")
    if tower == "text":
        if format != "onnx" or int8:
            raise ClipkdError("`tower`=text exports fp32 ONNX (no `int8`, no TensorRT: text runs once per query)")
        return _export_text(model, out)
    calib_files = _calibration(calib, calib_count) if int8 else []
    images = images if images is not None else default_images(model)
    if images is None:
        raise ClipkdError("give `images` (sample images for the parity check against PyTorch)")
    return _export_image(model, out, format, sample_images(images, samples), calib_files, fp16)


def _calibration(calib: str | Path | None, count: int) -> list[Path]:
    if calib is None:
        raise ClipkdError("`int8` needs `calib`=DIR (calibration images, e.g. a few hundred training images)")
    files = sample_images(calib, count)
    if len(files) < MIN_CALIBRATION:
        raise ClipkdError(f"`calib`={calib} has {len(files)} images; INT8 calibration needs at least "
                          f"{MIN_CALIBRATION}")
    return files


def _export_image(model: str | Path, out: Path, format: str, files: list[Path], calib_files: list[Path],
                  fp16: bool) -> ExportResult:
    """The image tower (or student) → ONNX (INT8 when ``calib_files``) → TensorRT when asked, parity-checked."""
    int8 = bool(calib_files)
    module, meta, transform = _source(model)
    x = batch_images(files, transform)
    with torch.no_grad():
        reference = module(x).float()
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_out = out if format == "onnx" else out.with_suffix(".onnx")
    meta.update(precision="fp32", opset=OPSET, input="image", input_shape=["batch", *x.shape[1:]])
    if int8:  # the fp32 model is an intermediate: written beside the output, replaced by the INT8 one
        with tempfile.TemporaryDirectory(prefix="clipkd-export-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _write_onnx(module, x[:1], fp32, meta)
            lo, mean = _parity(fp32, reference, x)
            _check_parity(lo, model)
            from .quantize import quantize_int8

            extra = quantize_int8(fp32, onnx_out, batch_images(calib_files, transform), meta)
            extra["fp32_min_cosine"] = lo
    else:
        _write_onnx(module, x[:1], onnx_out, meta)
        extra = {}
    lo, mean = _parity(onnx_out, reference, x)
    if not int8:
        try:
            _check_parity(lo, model)
        except ClipkdError:
            onnx_out.unlink(missing_ok=True)
            raise
    else:
        log.info("INT8 vs fp32 PyTorch on %d samples: cosine min %.4f, mean %.4f", len(x), lo, mean)
    final = onnx_out
    if format == "tensorrt":
        from .tensorrt import build_engine

        final = build_engine(onnx_out, out, fp16=fp16, int8=int8, meta=read_meta(onnx_out))  # keeps its ONNX
    return ExportResult(final, format, read_meta(onnx_out) if final == onnx_out else meta, len(x), lo, mean,
                        final.stat().st_size, extra)


def _export_text(model: str | Path, out: Path) -> ExportResult:
    """The text tower of ``model`` → ``out`` (ONNX), checked against PyTorch on :data:`SAMPLE_TEXTS`."""
    module, meta, tokenizer = _text_source(model)
    tokens = tokenizer(list(SAMPLE_TEXTS)).long()
    with torch.no_grad():
        reference = module(tokens).float()
    meta.update(precision="fp32", opset=OPSET, input="tokens", input_shape=["batch", int(tokens.shape[1])])
    spec = _embedded_tokenizer(tokenizer, int(tokens.shape[1]))
    meta["tokenizer"]["embedded"] = spec is not None
    out.parent.mkdir(parents=True, exist_ok=True)
    causal = bool(getattr(module.clip, "text_causal", False))
    _write_onnx(module, tokens[:2], out, meta, {TOKENIZER_KEY: json.dumps(spec)} if spec else None, seq=causal)
    lo, mean = _parity(out, reference, tokens)
    if read_meta(out).get("input_shape", [None, None])[1] == "seq":  # the cut tokens give the same embeddings
        used = int(np.flatnonzero(tokens.numpy().any(0)).max()) + 1
        lo = min(lo, _parity(out, reference, tokens[:, :used])[0])
    try:
        _check_parity(lo, model)
    except ClipkdError:
        out.unlink(missing_ok=True)
        raise
    return ExportResult(out, "onnx", read_meta(out), len(tokens), lo, mean, out.stat().st_size)


# texts the embedded tokenizer must tokenise exactly as open_clip does, beyond the parity samples: cleaning (HTML
# entities, mojibake ftfy repairs, whitespace runs, case), contractions, digits, punctuation runs, scripts, emoji,
# the special tokens typed as text, and truncation
TOKENIZER_CHECKS = ("Tom's CAT &amp; a dog&#39;s   bowl\t\n", "cafÃ© au lait", "it'll be 2024-05-17, 10:30!!!",
                    "naïve façade — “quoted” … ½ ℃", "東京タワーの夜景 🗼✨", "Привет, мир",
                    "<start_of_text>hi<end_of_text>", " ".join(["photograph"] * 80), "", "x")


def _embedded_tokenizer(tokenizer: Any, context: int) -> dict[str, Any] | None:
    """open_clip's tokenizer rebuilt for :mod:`clipkd.deployed` (Hugging Face ``tokenizers``), if it is a kind that
    can be and gives the very same ids on the parity and check texts; else ``None`` (the file then needs open_clip)."""
    from ..deployed import BpeTokenizer, bpe_tokenizer_spec

    spec = bpe_tokenizer_spec(tokenizer, context)
    if spec is None:
        log.info("the text tower's tokenizer (%s) is not embedded: tokenising needs open_clip",
                 type(tokenizer).__name__)
        return None
    texts = [*SAMPLE_TEXTS, *TOKENIZER_CHECKS]
    if not np.array_equal(BpeTokenizer(spec)(texts), tokenizer(texts).long().numpy()):
        log.warning("the rebuilt tokenizer disagrees with open_clip's on a check text: not embedded (tokenising the "
                    "exported text tower needs open_clip)")
        return None
    return spec


def _check_parity(lo: float, model: Any) -> None:
    if lo < PARITY_MIN:
        raise ClipkdError(f"the ONNX export of {model} disagrees with PyTorch: cosine {lo:.6f} < {PARITY_MIN} on a "
                          "sample image; nothing written")


def read_meta(path: Path) -> dict[str, Any]:
    from ..students.onnx import read_metadata

    return read_metadata(path)
