"""Quantization-aware training (PyTorch-native, ``torch.ao`` FX graph mode) and its INT8 ONNX export.

:func:`prepare_qat` folds each BatchNorm into its convolution (inference statistics, as the deployed model runs),
traces the student with ``torch.fx`` and inserts fake quantization: weights per output channel, symmetric int8;
activations per tensor, uint8 with moving-average ranges. Fine-tuning then learns weights that survive rounding.
:func:`export_qat_onnx` writes the trained graph as a QDQ ONNX file (``QuantizeLinear``/``DequantizeLinear`` pairs
that ONNX Runtime runs with its int8 kernels, and TensorRT builds as INT8) with clipkd's metadata.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ClipkdError, first_line
from .model import Student, StudentConfig


def _qconfig():
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
    )

    # ONNX's QuantizeLinear takes uint8 0..255 and int8 -128..127 ranges
    return QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                          dtype=torch.quint8, qscheme=torch.per_tensor_affine),
        weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                      dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0))


class QatStudent(nn.Module):
    """A student under quantization-aware training: the fake-quantized graph, with the student's ``cfg``."""

    def __init__(self, cfg: StudentConfig, net: nn.Module) -> None:
        super().__init__()
        self.cfg, self.net = cfg, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def prepare_qat(student: Student) -> QatStudent:
    """Fold BatchNorms, trace and insert fake quantization (a one-line error when the architecture cannot be
    traced by ``torch.fx``)."""
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    from torch.fx.experimental.optimization import fuse

    cfg = student.cfg
    example = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    try:
        fused = fuse(student.eval())
        net = prepare_qat_fx(fused.train(), QConfigMapping().set_global(_qconfig()), (example,))
        net(example)
    except Exception as e:  # noqa: BLE001 - tracing failures come in many types
        raise ClipkdError(f"`qat`: timm '{cfg.arch}' cannot be prepared for quantization-aware training "
                          f"(torch.fx tracing failed: {first_line(e, 160)}); use PTQ: clipkd export --int8") from None
    return QatStudent(cfg, net)


def _scalar_qparams(model: Any) -> None:
    """Per-tensor scales and zero points as scalars (the exporter writes shape [1]; ONNX Runtime's fused int8 kernels
    such as QLinearAveragePool need scalars)."""
    from onnx import numpy_helper

    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for name in node.input[1:]:
            if name in consts:
                t = consts[name].attribute[0].t
                a = numpy_helper.to_array(t)
                if a.shape == (1,):
                    t.CopyFrom(numpy_helper.from_array(a.reshape(()), t.name))
            elif name in inits:
                a = numpy_helper.to_array(inits[name])
                if a.shape == (1,):
                    inits[name].CopyFrom(numpy_helper.from_array(a.reshape(()), name))


def export_qat_onnx(student: QatStudent, out: str | Path, meta: dict[str, Any], check: torch.Tensor | None = None,
                    min_cosine: float = 0.999) -> float:
    """Write the trained QAT graph as an INT8 (QDQ) ONNX file with clipkd's metadata; return the lowest cosine
    between ONNX Runtime and the fake-quantized PyTorch graph on ``check`` (random images when none)."""
    import onnx
    from torch.ao.quantization import disable_observer

    from .onnx import OnnxStudent, save_onnx_atomic, set_metadata

    out = Path(out)
    net = student.net.cpu().eval()
    net.apply(disable_observer)
    size = student.cfg.image_size
    x = check if check is not None else torch.randn(4, 3, size, size)
    output = "logits" if student.cfg.kind == "classifier" else "embedding"
    with tempfile.TemporaryDirectory(prefix="clipkd-export-") as tmp:  # not beside `out`: a kill leaves no litter
        raw = Path(tmp) / "qat.onnx"
        torch.onnx.export(net, (x[:1],), str(raw), input_names=["image"], output_names=[output],
                          dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}}, opset_version=18, dynamo=False)
        m = onnx.load(str(raw))
        _scalar_qparams(m)
        set_metadata(m, {**meta, "precision": "int8", "opset": 18, "input": "image", "input_shape": ["batch", 3, size,
                                                                                                      size],
                         "quantization": {"method": "qat", "format": "QDQ", "per_channel": True}})
        onnx.checker.check_model(m)
        save_onnx_atomic(m, out)
    with torch.no_grad():
        ref = net(x).float()
    got = OnnxStudent(out, "cpu")(x).float()
    lo = float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min())
    if lo < min_cosine:
        out.unlink(missing_ok=True)
        raise ClipkdError(f"the INT8 ONNX export of the QAT student disagrees with its PyTorch graph (cosine {lo:.5f} "
                          f"< {min_cosine}); nothing written")
    return lo
