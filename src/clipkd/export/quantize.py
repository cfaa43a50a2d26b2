"""INT8 post-training static quantization of an exported model with ONNX Runtime's tools (QDQ format,
per-channel weights, calibration on real images), keeping clipkd's metadata."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a preprocessed batch, a few images at a time."""

    def __init__(self, name: str, images: torch.Tensor, batch: int = 8) -> None:
        self.name, self.chunks = name, [images[i : i + batch].numpy() for i in range(0, len(images), batch)]
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.chunks):
            return None
        self.pos += 1
        return {self.name: np.ascontiguousarray(self.chunks[self.pos - 1], dtype=np.float32)}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(fp32: Path, out: Path, calib: torch.Tensor, meta: dict[str, Any],
                  method: str = "minmax") -> dict[str, Any]:
    """Quantize ``fp32`` into ``out`` (atomically) with ``calib`` (preprocessed calibration images)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..students.onnx import save_onnx_atomic, set_metadata

    with tempfile.TemporaryDirectory(prefix="clipkd-export-") as tmp:  # not beside `out`: a kill leaves no litter
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        q = Path(tmp) / "int8.onnx"
        name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        quantize_static(str(pre), str(q), _Reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[method])
        m = onnx.load(str(q))
        set_metadata(m, {**meta, "precision": "int8", "quantization": {"method": "static", "format": "QDQ",
                                                                        "per_channel": True, "calibrate": method,
                                                                        "calibration_images": len(calib)}})
        save_onnx_atomic(m, out)
    return {"calibration_images": len(calib)}
