"""The ONNX files clipkd writes: its self-description in the metadata (key ``clipkd``, JSON), atomic saves, and the
ONNX Runtime providers and sessions to run them with. A leaf without PyTorch: students (image towers), teachers (text
towers) and the deployed models of :mod:`clipkd.deployed` all use it."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import ClipkdError, first_line

ONNX_FORMAT = "clipkd-onnx/1"
META_KEY = "clipkd"
TOKENIZER_KEY = "clipkd.tokenizer"  # an exported text tower's tokenizer (see clipkd.deployed.BpeTokenizer)


def set_metadata(m: Any, meta: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    """Write clipkd's description (``meta``), and any ``extra`` properties (e.g. :data:`TOKENIZER_KEY`), into an
    ``onnx.ModelProto``'s metadata."""
    props = {META_KEY: json.dumps({"format": ONNX_FORMAT, **meta}), **(extra or {})}
    for p in list(m.metadata_props):
        if p.key in props:
            m.metadata_props.remove(p)
    for key, value in props.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = key, value
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
    return parse_metadata({p.key: p.value for p in model.metadata_props}, path)


def parse_metadata(props: dict[str, str], path: str | Path) -> dict[str, Any]:
    """clipkd's description from an ONNX file's metadata properties (``onnx`` or an ONNX Runtime session's
    ``custom_metadata_map``), checked; a one-line error when it is missing or malformed."""
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


def onnx_providers(device: Any = None) -> list[str]:
    """ONNX Runtime providers: CUDA first when asked for (or ``auto``) and present, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    want_cuda = device is None or str(device) in ("auto",) or str(device).startswith("cuda")
    return (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in have else []) + [
        "CPUExecutionProvider"]


SPIN_ENV = "CLIPKD_SPIN"  # "1": a server's threads spin between queries as the libraries' own defaults do
THREADS: int | None = None  # intra-op threads of the sessions this process opens (None: ONNX Runtime's default)


def set_threads(n: int | None) -> None:
    """The threads one process gives a query's work: ONNX Runtime sessions opened from now on, and FAISS's OpenMP
    pool. ``serve`` sets it per worker (several workers sharing the cores each take their share, instead of every
    one spinning a thread per core). None: the libraries' defaults (every core)."""
    global THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ClipkdError(f"`threads` must be a whole number of at least 1, got {n!r}")
    THREADS = n
    if n is not None:
        if "torch" in sys.modules:  # a server of PyTorch models
            sys.modules["torch"].set_num_threads(n)
        try:
            import faiss
        except ImportError:  # a server of a Milvus index may have no FAISS
            return
        faiss.omp_set_num_threads(n)


def open_session(path: str | Path, device: Any = None,
                 spin: bool = False) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """An ONNX Runtime session for a clipkd export, its description and all its metadata properties (read from the
    session: no second parse of the file); one-line errors for a missing, unreadable or undescribed file. With
    :data:`THREADS` set (a server), the session's threads sleep between runs unless ``spin``: the text tower spins
    (a new query text is a long run of small ops, 11 against 13 ms at one client), the image model does not (it runs
    all the time under load, where spinning threads took a quarter of the queries/s: bench_search_load.py)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ClipkdError(f"ONNX file not found: {path}")
    try:
        options = ort.SessionOptions()
        if THREADS is not None:  # a server's share of the cores; no spinning threads between its queries
            options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
            spin = spin or os.environ.get(SPIN_ENV) == "1"  # an operator's choice: every session spins
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        session = ort.InferenceSession(str(path), options, providers=onnx_providers(device))
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors are long
        raise ClipkdError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None
    props = dict(session.get_modelmeta().custom_metadata_map)
    return session, parse_metadata(props, path), props
