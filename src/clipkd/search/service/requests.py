"""What a request brings, checked: the body within its size limit, JSON or multipart, base64 and image bytes, filter
values; every failure a :class:`QueryError` with a one-line message that never echoes the input or an object repr."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Any

from PIL import Image

from ...data.images import to_rgb

MAX_UPLOAD = 20 << 20  # bytes of one uploaded image
MAX_PIXELS = 40_000_000  # pixels of one query image (decompression bombs are refused before decoding)
MAX_BODY = MAX_UPLOAD + (1 << 16)  # a body: one image and its form fields
BODY_TIMEOUT_S = 30.0  # a body must arrive within this (a slow client does not hold a request open for ever)


class QueryError(Exception):
    """A bad query: HTTP ``status`` with a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes → RGB image; 413 for too many pixels (checked from the header, before decoding), 400 otherwise."""
    if not data:
        raise QueryError(400, "empty image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise QueryError(413, f"image of {w}×{h} pixels is larger than the {max_pixels} allowed")
        img.load()
        return to_rgb(img)
    except QueryError:
        raise
    except Image.DecompressionBombError as e:
        raise QueryError(413, f"image refused: {e}") from None
    except Image.UnidentifiedImageError:  # Pillow's message names its BytesIO object: not for a client
        raise QueryError(400, "cannot decode the image: not a format this server reads (JPEG, PNG, WebP, GIF, BMP, "
                              "TIFF)") from None
    except Exception as e:  # noqa: BLE001 - anything Pillow cannot decode is the client's problem
        raise QueryError(400, f"cannot decode the image ({type(e).__name__}: {_no_repr(str(e))[:200]})") from None


def _no_repr(text: str) -> str:
    """``text`` without Python object reprs (``<_io.BytesIO object at 0x7f...>``): what a client is shown."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "the upload", text)


def b64decode(data: Any) -> bytes:
    """A base64 image field (a ``data:`` URL too) → bytes; 400 if it is not base64, 413 if too large."""
    if not isinstance(data, str):
        raise QueryError(400, "image must be a base64 string")
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError(400, "image is not valid base64") from None
    if len(raw) > MAX_UPLOAD:
        raise QueryError(413, f"image larger than {MAX_UPLOAD} bytes")
    return raw


def filter_value(column: str, value: Any) -> str:
    """A filter's value as the column holds it: a string, or a whole number (``2024`` matches ``"2024"``); anything
    else is a 400, whether it came as ``label`` or inside ``where``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise QueryError(400, f"the filter on {column[:40]!r} must be a string or a whole number")


def validation_message(errors: Any) -> str:
    """FastAPI's validation errors as one line: where and what (``query thumb: Input should be a valid
    integer``), never the input."""
    parts = [f"{' '.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors]
    return "; ".join(parts)[:300] or "invalid request"


async def read_limited(request: Any, timeout_s: float | None = None) -> bytes:
    """A request's body, refused with a 413 as soon as it passes :data:`MAX_BODY` (by its header or as it
    streams), a 408 when it has not all arrived within ``timeout_s`` (default :data:`BODY_TIMEOUT_S`), and a 499
    (nginx's "client closed request": nothing can be answered, the metrics count it) when the client hangs up."""
    import anyio
    from starlette.requests import ClientDisconnect

    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise QueryError(413, f"body larger than {MAX_UPLOAD} bytes")
    chunks, n = [], 0
    limit = BODY_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        with anyio.fail_after(limit):  # asyncio.timeout is Python 3.11's; clipkd runs on 3.10
            async for chunk in request.stream():
                chunks.append(chunk)
                n += len(chunk)
                if n > MAX_BODY:
                    raise QueryError(413, f"body larger than {MAX_UPLOAD} bytes")
    except TimeoutError:
        raise QueryError(408, f"the request's body did not arrive within {limit:g} s") from None
    except ClientDisconnect:
        raise QueryError(499, "the client closed the connection before its request arrived") from None
    return b"".join(chunks)


def parse_json(body: bytes, what: str = "the body must be JSON") -> Any:
    """JSON bytes → value (an empty body is ``None``); 400 with ``what`` otherwise."""
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise QueryError(400, what) from None


async def json_body(request: Any) -> dict[str, Any]:
    """A request's JSON object (size-limited); 400 for anything else."""
    body = parse_json(await read_limited(request))
    if not isinstance(body, dict):
        raise QueryError(400, "the body must be a JSON object")
    return body


async def parse_form(body: bytes, ctype: str) -> dict[str, Any]:
    """A multipart body (already size-checked) → ``{name: bytes for files | str for fields}``."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers({"content-type": ctype}), stream(), max_part_size=MAX_UPLOAD + 1).parse()
    except MultiPartException as e:
        raise QueryError(400, f"bad multipart body: {e.message}") from None
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        out[key] = await value.read() if isinstance(value, UploadFile) else value
    return out
