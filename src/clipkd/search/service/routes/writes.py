"""``POST /index/remove`` and ``/index/add``: changing the served index over HTTP (bearer token required); each
answered once this server searches the new generation."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ....errors import ClipkdError
from ..core import SearchService, without_root
from ..deps import authorised, current_service, json_object
from ..requests import QueryError

router = APIRouter(dependencies=[Depends(authorised)])  # the token is checked before the body is read


@router.post("/index/remove")
async def index_remove(request: Request, body: dict[str, Any] = Depends(json_object),
                       svc: SearchService = Depends(current_service)) -> JSONResponse:
    """Remove images (``{"ids": [...]}`` as results name them, or ``{"paths": [...]}`` relative to the
    collection root) from the index; answered once this server searches the new generation. Needs the bearer
    token."""
    from ...writers import remove_from_index

    ix = svc.index
    keys = _removal_keys(svc, body.get("ids"), body.get("paths"))
    return JSONResponse(await run_in_threadpool(
        _update, request.app, lambda: remove_from_index(ix.root, keys, images_root=ix.images_root)))


def _removal_keys(svc: SearchService, ids: Any, paths: Any) -> list[str]:
    """The index keys a removal names, checked: ids of live images, or the index's own keys (as --show-paths
    shows them), never a file of the server's resolved here."""
    ix = svc.index
    if (ids is None) == (paths is None) or not isinstance(ids if ids is not None else paths, list) or \
            not (ids or paths):
        raise QueryError(400, 'give a non-empty list of "ids" or of "paths"')
    if ids is not None:
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise QueryError(400, "ids must be whole numbers")
        gone = [i for i in ids if not ix.is_live(i)]
        if gone:
            raise QueryError(404, f"image {gone[0]} was removed from this index" if svc.removed(gone[0]) else
                             f"no indexed image with id {gone[0]}")
        return [ix.key(i) for i in ids]
    if not all(isinstance(p, str) for p in paths):
        raise QueryError(400, "paths must be strings")
    known = set(ix.paths)
    unknown = sum(p not in known for p in paths)
    if unknown:
        raise QueryError(404, f"{unknown} of the {len(paths)} paths are not keys of this index (give them as the "
                              "index lists them, relative to the collection root)")
    return paths


@router.post("/index/add")
async def index_add(request: Request, body: dict[str, Any] = Depends(json_object),
                    svc: SearchService = Depends(current_service)) -> JSONResponse:
    """Embed and add images: ``{"images": "sub/folder"}`` (a folder or image list under the collection root, as
    ``clipkd index add --images`` takes). Needs the bearer token, and PyTorch on the server (a lean server
    says so: run ``clipkd index add`` where it is installed; this server picks the change up)."""
    from ...writers import add_to_index

    ix = svc.index
    rel = body.get("images")
    if not isinstance(rel, str) or not rel.strip():
        raise QueryError(400, 'give "images": a folder or image list under the collection root')
    target = (ix.images_root / rel).resolve()
    if not target.is_relative_to(ix.images_root) or Path(rel).is_absolute():
        raise QueryError(400, "images must lie under the collection root (a relative path)")
    if not target.exists():
        raise QueryError(404, f"no folder or image list {rel!r} under the collection root")
    try:
        import torch  # noqa: F401 - embedding new images runs the loaders of clipkd[train]
    except ImportError:
        raise QueryError(501, "adding images needs PyTorch on this server (pip install 'clipkd[train]'); run "
                              "`clipkd index add` where it is installed: this server picks the change up") from None

    def add() -> int:
        before = len(request.app.state.service.index)
        return len(add_to_index(ix.root, target, progress=False, images_root=ix.images_root)) - before

    return JSONResponse(await run_in_threadpool(_update, request.app, add))


def _update(app: Any, change: Callable[[], int]) -> dict[str, Any]:
    """Run an index change (under this process's update lock and the index's own), then swap to it."""
    with app.state.updates:
        try:
            n = change()
        except ClipkdError as e:
            raise QueryError(409 if "in use by another" in str(e) else 400,
                             without_root(str(e), app.state.service.index.root)) from None
        app.state.reloader.check()
    ix = app.state.service.index
    return {"changed": n, "images": len(ix), "generation": ix.generation}
