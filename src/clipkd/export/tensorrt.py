"""TensorRT engines from clipkd's ONNX exports — where a CUDA GPU and the ``tensorrt`` package are present.

Elsewhere :func:`check_tensorrt` says in one line what is missing, before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ClipkdError
from ..fileio import atomic_write, write_json


def check_tensorrt() -> None:
    """A one-line error unless a CUDA GPU and the ``tensorrt`` package are both present."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible to PyTorch)")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the tensorrt package (pip install tensorrt)")
    if missing:
        raise ClipkdError(f"`format`=tensorrt needs {' and '.join(missing)}; `format`=onnx works here")


def build_engine(onnx_path: Path, out: Path, fp16: bool = True, int8: bool = False, meta: dict[str, Any] | None = None,
                 max_batch: int = 64) -> Path:
    """Build a serialized engine from ``onnx_path`` (dynamic batch 1..``max_batch``, optimised for 1) into ``out``,
    with clipkd's metadata beside it (``out`` + ``.json``). ``int8`` expects a QDQ (quantized) ONNX file."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ClipkdError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if (meta or {}).get("sparsity") == "2:4":
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = tuple(inp.shape[1:])
    profile.set_shape(inp.name, (1, *shape), (1, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ClipkdError(f"TensorRT could not build an engine from {onnx_path}")
    atomic_write(out, lambda f: f.write(bytes(engine)))
    write_json(Path(f"{out}.json"), {**(meta or {}), "engine": {"fp16": fp16, "int8": int8, "max_batch": max_batch,
                                                               "tensorrt": trt.__version__}})
    return out
