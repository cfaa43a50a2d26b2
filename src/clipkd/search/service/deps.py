"""What the routes depend on (FastAPI ``Depends``): the service of the generation being served, and the token that
index-changing routes require."""

import hmac

from fastapi import Request

from .core import SearchService
from .requests import QueryError, json_body


async def current_service(request: Request) -> SearchService:
    """The service a request holds from start to end (the reloader may swap the app's meanwhile: no request mixes
    two generations)."""
    return request.app.state.service


async def authorised(request: Request) -> None:
    """Index-changing routes: refused unless the server was given a token and the request carries it."""
    token = request.app.state.token
    if token is None:
        raise QueryError(403, "updates over HTTP are off: start serve with --token-file FILE (or CLIPKD_TOKEN) "
                              "to allow them")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise QueryError(401, "this route changes the index: send 'Authorization: Bearer <token>'")


async def json_object(request: Request) -> dict:
    """The request's JSON object body (size-limited; 400 for anything else)."""
    return await json_body(request)
