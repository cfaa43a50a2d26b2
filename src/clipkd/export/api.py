"""``export_model``: one entry point over the export formats (ONNX and TensorRT files, timm and open_clip
folders), each format's writer in its own module."""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipkdError
from .common import FOLDER_FORMATS, FORMATS, ExportResult


def export_model(model: str | Path, out: str | Path, format: str = "onnx", images: str | Path | None = None,
                 samples: int = 16, int8: bool = False, calib: str | Path | None = None, calib_count: int = 128,
                 fp16: bool = True, tower: str = "image", text: str | Path | None = None,
                 results: str | Path | None = None, license: str = "other",
                 push_to_hub: str | None = None) -> ExportResult:
    """Export ``model`` (a distilled or supervised student, a clip-train run, a teacher spec) to ``out``.

    ``tower="text"``: a CLIP's text tower instead (open_clip models; parity on :data:`SAMPLE_TEXTS`), fp32 ONNX.

    ``images``: sample images for the parity check (default: a student run's training images).
    ``int8``: post-training static quantization with ``calib`` images (at least :data:`MIN_CALIBRATION`).
    ``format="tensorrt"``: an engine (fp16; int8 from the quantized model) — needs a CUDA GPU and ``tensorrt``; the
    ONNX it is built from is kept beside it (same name, ``.onnx``).
    ``format="timm"`` / ``"open_clip"``: a folder that timm / open_clip load without clipkd
    (:func:`clipkd.export.folder.export_folder`: ``text``, ``results``, ``license``, ``push_to_hub``).
    """
    out = Path(out)
    if format not in FORMATS:
        raise ClipkdError(f"unknown export format '{format}' ({', '.join(FORMATS)})")
    if format in FOLDER_FORMATS:
        if int8 or tower != "image":
            raise ClipkdError(f"`format`={format} writes the fp32 model (no `int8`, no `tower`=text: the folder holds "
                              "both towers of a CLIP)")
        from .folder import export_folder

        return export_folder(model, out, format, images, samples, text, results, license, push_to_hub)
    given = [n for n, v in (("text", text), ("results", results), ("push_to_hub", push_to_hub)) if v]
    if given:
        raise ClipkdError(f"`{given[0]}` goes with a folder export (`format`=timm or open_clip), not {format}")
    from .onnx import export_onnx

    return export_onnx(model, out, format, images, samples, int8, calib, calib_count, fp16, tower)
