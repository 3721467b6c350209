"""Apps served by uvicorn for the requests-per-second benchmark (``bench_http``).

The same chat route as the in-process full-stack benchmark (``stack_apps``): bare, behind
slowapi's decorator (one limit), and behind the whole stack with its four-dimension policy.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.stack_apps import bare as _bare
from benchmarks.stack_apps import chat
from benchmarks.stack_apps import full as _full

PATH = "/v1/chat/completions"


def _slowapi() -> Starlette:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

    @limiter.limit("100000000/minute")
    async def limited(request: Request) -> JSONResponse:
        return await chat(request)

    app = Starlette(routes=[Route(PATH, limited, methods=["POST"])])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


bare = _bare()
slowapi = _slowapi()
stack = _full()
