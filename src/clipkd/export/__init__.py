"""Deploying models: ONNX export with clipkd's metadata and a parity check, INT8 (post-training static
quantization), TensorRT engines where a CUDA GPU and ``tensorrt`` are present."""

from .api import export_model
from .common import ExportConfig, ExportResult

__all__ = ["ExportConfig", "ExportResult", "export_model"]
