"""``export_model``: one entry point over the export formats (ONNX and TensorRT files, timm and open_clip
folders), each format's writer in its own module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import settle
from ..errors import ClipkdError
from .common import FOLDER_FORMATS, FORMATS, ExportConfig, ExportResult


def export_model(model: str | Path, out: str | Path, cfg: ExportConfig | None = None,
                 **settings: Any) -> ExportResult:
    """Export ``model`` (a distilled or supervised student, a clip-train run, a teacher spec) to ``out``, as ``cfg``
    says (:class:`~clipkd.export.common.ExportConfig`; its fields may also be given as keywords, on top of it).

    ``tower="text"``: a CLIP's text tower instead (open_clip models; parity on :data:`SAMPLE_TEXTS`), fp32 ONNX.
    ``images``: sample images for the parity check (default: a student run's training images).
    ``int8``: post-training static quantization with ``calib`` images (at least :data:`MIN_CALIBRATION`).
    ``format="tensorrt"``: an engine (fp16; int8 from the quantized model) — needs a CUDA GPU and ``tensorrt``; the
    ONNX it is built from is kept beside it (same name, ``.onnx``).
    ``format="timm"`` / ``"open_clip"``: a folder that timm / open_clip load without clipkd
    (:func:`clipkd.export.folder.export_folder`: ``text``, ``results``, ``license``, ``push_to_hub``).
    """
    c = settle(ExportConfig, cfg, settings, "export_model", first="format")
    out = Path(out)
    if c.format not in FORMATS:
        raise ClipkdError(f"unknown export format '{c.format}' ({', '.join(FORMATS)})")
    if c.format in FOLDER_FORMATS:
        if c.int8 or c.tower != "image":
            raise ClipkdError(f"`format`={c.format} writes the fp32 model (no `int8`, no `tower`=text: the folder "
                              "holds both towers of a CLIP)")
        from .folder import export_folder

        return export_folder(model, out, c.format, c.images, c.samples, c.text, c.results, c.license, c.push_to_hub)
    given = [n for n, v in (("text", c.text), ("results", c.results), ("push_to_hub", c.push_to_hub)) if v]
    if given:
        raise ClipkdError(f"`{given[0]}` goes with a folder export (`format`=timm or open_clip), not {c.format}")
    from .onnx import export_onnx

    return export_onnx(model, out, c.format, c.images, c.samples, c.int8, c.calib, c.calib_count, c.fp16, c.tower)
