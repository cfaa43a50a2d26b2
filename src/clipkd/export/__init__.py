"""Deploying models: ONNX export with clipkd's metadata and a parity check, INT8 (post-training static
quantization), TensorRT engines where a CUDA GPU and ``tensorrt`` are present."""

from .api import export_model
from .common import ExportResult

__all__ = ["ExportResult", "export_model"]
