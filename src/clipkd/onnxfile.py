"""The ONNX files clipkd writes: its self-description in the metadata (key ``clipkd``, JSON), atomic saves, and the
ONNX Runtime providers to run them with. A leaf: students (image towers) and teachers (text towers) both use it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ClipkdError, first_line

ONNX_FORMAT = "clipkd-onnx/1"
META_KEY = "clipkd"


def set_metadata(m: Any, meta: dict[str, Any]) -> None:
    """Write clipkd's description (``meta``) into an ``onnx.ModelProto``'s metadata."""
    for p in list(m.metadata_props):
        if p.key == META_KEY:
            m.metadata_props.remove(p)
    entry = m.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps({"format": ONNX_FORMAT, **meta})
    m.producer_name = "clipkd"


def save_onnx_atomic(m: Any, out: Path) -> None:
    """``onnx.save`` to a temp file beside ``out``, then rename it over ``out``."""
    import onnx

    from .fileio import file_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    try:
        onnx.save(m, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str | Path) -> dict[str, Any]:
    """clipkd's description of an exported model; a one-line error when the file lacks it (or is not ONNX)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ClipkdError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure: not an ONNX file
        raise ClipkdError(f"{path} is not a readable ONNX file: {first_line(e)}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ClipkdError(f"{path} has no clipkd metadata (preprocessing, output kind): export it with "
                          "`clipkd export`, or add the metadata it would write")
    try:
        meta = json.loads(props[META_KEY])
    except json.JSONDecodeError as e:
        raise ClipkdError(f"{path}: clipkd metadata is not JSON ({e})") from None
    if meta.get("format") != ONNX_FORMAT or "preprocess" not in meta or "kind" not in meta:
        raise ClipkdError(f"{path}: clipkd metadata lacks the format, preprocessing or output kind ({ONNX_FORMAT})")
    return meta


def onnx_providers(device: str | torch.device | None = None) -> list[str]:
    """ONNX Runtime providers: CUDA first when asked for (or ``auto``) and present, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    want_cuda = device is None or str(device) in ("auto",) or str(device).startswith("cuda")
    return (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in have else []) + [
        "CPUExecutionProvider"]
