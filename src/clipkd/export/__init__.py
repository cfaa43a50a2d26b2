"""Deploying models: ONNX export with clipkd's metadata and a parity check, INT8 (post-training static
quantization), TensorRT engines where a CUDA GPU and ``tensorrt`` are present."""

from .onnx import ExportResult, export_model

__all__ = ["ExportResult", "export_model"]
