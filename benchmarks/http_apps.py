"""Apps served by uvicorn for the requests-per-second benchmark (``bench_http``)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aimiddleware


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def _base() -> Starlette:
    return Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])])


def _slowapi() -> Starlette:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

    @limiter.limit("100000000/minute")
    async def limited(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/", limited, methods=["GET", "POST"])])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


bare = _base()
slowapi = _slowapi()
stack = aimiddleware.install(_base())
