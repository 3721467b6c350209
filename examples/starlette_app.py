"""The middleware added one by one to a plain Starlette app (no install())."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import (
    ErrorMiddleware,
    InvalidRequest,
    RequestContextMiddleware,
    current,
    register_exception_handlers,
)


async def classify(request: Request) -> JSONResponse:
    payload = await request.json()
    text = payload.get("text")
    if not isinstance(text, str) or not text:
        raise InvalidRequest("'text' must be a non-empty string", param="text")
    return JSONResponse(
        {"label": "long" if len(text) > 20 else "short", "id": current().request_id}
    )


app = Starlette(routes=[Route("/classify", classify, methods=["POST"])])
app.add_middleware(ErrorMiddleware)  # inner
app.add_middleware(RequestContextMiddleware, max_body_size=64 * 1024)  # outermost
register_exception_handlers(app)  # the router's own 404/405 as problem+json too
