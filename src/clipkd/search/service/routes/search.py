"""``POST /search``: clipkd's own query route (multipart upload or JSON)."""

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..core import SearchService
from ..deps import current_service
from ..requests import QueryError, parse_form, parse_json, read_limited

router = APIRouter()


@router.post("/search")
async def search(request: Request, svc: SearchService = Depends(current_service)) -> JSONResponse:
    """Multipart (``image`` file, optional ``k``, ``label``) or JSON (``text`` | ``image`` base64 | ``id``,
    ``k``, ``label``, ``where``: ``{"column": "value"}`` over an image list's other columns)."""
    ctype = request.headers.get("content-type", "")
    body = await read_limited(request)
    if ctype.startswith("multipart/form-data"):
        results, k = await _multipart(svc, await parse_form(body, ctype))
    else:
        data = parse_json(body, "the body is neither multipart nor JSON")
        results, k = await run_in_threadpool(svc.by_json, data)
    return JSONResponse({"results": [svc.public(r) for r in results], "k": k, "generation": svc.index.generation})


async def _multipart(svc: SearchService, form: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    k = svc.check_k(form.get("k", 10))
    label = form.get("label")
    allowed = svc.filter(label.decode() if isinstance(label, bytes) else label)
    if "image" in form and isinstance(form["image"], bytes):
        return await run_in_threadpool(svc.by_image_bytes, form["image"], k, allowed), k
    if form.get("text"):
        return await run_in_threadpool(svc.by_text, form["text"], k, allowed), k
    raise QueryError(400, "send an 'image' file or a 'text' field")
