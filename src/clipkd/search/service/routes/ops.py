"""The web page, health and Prometheus metrics, and clip-retrieval's index list."""

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from ..core import SearchService
from ..deps import current_service

PAGE = Path(__file__).parents[2] / "page.html"
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.get("/health")
async def health(svc: SearchService = Depends(current_service)) -> dict[str, Any]:
    """Liveness and what is served (``generation``: the index generation being answered from)."""
    ix = svc.index
    return {"status": "ok", "images": len(ix), "model": ix.identity, "text": ix.encoder.has_text,
            "kind": ix.info["kind"], "runtime": ix.encoder.runtime, "generation": ix.generation,
            "worker": os.getpid()}


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request) -> Response:
    """Prometheus metrics: requests and latency by route and status, index rows and generation, reloads, the
    batcher's queue and batch sizes, the text cache."""
    body, ctype = request.app.state.metrics.exposition()
    return Response(body, media_type=ctype)


@router.get("/indices-list")
async def indices_list(svc: SearchService = Depends(current_service)) -> list[str]:
    """clip-retrieval's list of index names (one here)."""
    return [svc.index.root.name]
