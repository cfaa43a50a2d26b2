"""``POST /knn-service``: clip-retrieval's protocol, as its ``ClipClient`` and the seed's search script speak it."""

import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..core import MAX_KNN, SearchService, knn_fields
from ..deps import current_service, json_object
from ..requests import QueryError

log = logging.getLogger("clipkd.search.service")
router = APIRouter()


@router.post("/knn-service")
async def knn_service(body: dict[str, Any] = Depends(json_object),
                      svc: SearchService = Depends(current_service)) -> JSONResponse:
    """clip-retrieval's protocol: ``{text | image (base64) | embedding_input, modality, num_images, ...}``
    → ``[{url, id, similarity, caption}]`` (``url`` absolute, pointing at ``/images/{id}``). ``num_result_ids``
    candidates are fetched (at least ``num_images``), ``deduplicate`` (default true) drops near-copies as
    clip-retrieval does, then ``num_images`` are returned; safety, violence and aesthetic fields are accepted
    and named in the ``X-Clipkd-Not-Computed`` header (no such model here)."""
    index = svc.index
    want = svc.check_k(body.get("num_images", 40), MAX_KNN, cap=True, name="num_images")
    k = max(want, svc.check_k(body.get("num_result_ids", want), MAX_KNN, cap=True,  # candidates, then dedupe
                              name="num_result_ids"))
    fields = knn_fields(body, index.root.name)
    results = await run_in_threadpool(_query, svc, body, k)
    if fields["deduplicate"]:
        results = svc.dedupe(results)
    answer = []
    for r in results[:want]:
        p = svc.public(r)
        answer.append({"url": p["url"], "id": r["id"], "similarity": r["score"], "caption": r["label"]}
                      | ({"path": p["path"]} if "path" in p else {}))
    headers = {"X-Clipkd-Index": index.root.name, "X-Clipkd-Generation": str(index.generation)}
    if fields["ignored"]:
        headers["X-Clipkd-Not-Computed"] = ",".join(fields["ignored"])
        _report(svc, fields["ignored"])
    return JSONResponse(answer, headers=headers)


def _query(svc: SearchService, body: dict[str, Any], k: int) -> list[dict[str, Any]]:
    if body.get("text"):
        return svc.by_text(body["text"], k)
    if body.get("image"):
        return svc.by_image_bytes(body["image"], k, b64=True)
    if body.get("embedding_input") is not None:
        return svc.by_vector(body["embedding_input"], k)
    if body.get("image_url"):
        raise QueryError(400, "image_url is not fetched by this server; send the image as base64 'image'")
    raise QueryError(400, "give text, image (base64) or embedding_input")


def _report(svc: SearchService, ignored: list[str]) -> None:
    """Log, once per server, the clip-retrieval fields it does not honour."""
    if not svc.reported:
        svc.reported = True
        log.warning("clip-retrieval fields %s are not honoured by this server (no safety, violence or aesthetic "
                    "model; one index, %r, whatever indice_name says): results come unfiltered from it (reported in "
                    "the X-Clipkd-Not-Computed header)", ignored, svc.index.root.name)
