"""Per-request cost of the context + errors (+ cancellation) layers, beside anchors.

Anchors, all in this run: a bare Starlette app; a pure-ASGI pass-through middleware (the
floor for any middleware); asgi-correlation-id (the request-id package most apps use).
Ours: context + errors, and context + errors + cancellation (the three outer layers
``install()`` always adds, in its order).
"""

from __future__ import annotations

from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import CancellationMiddleware, ErrorMiddleware, RequestContextMiddleware
from benchmarks.harness import as_json, compare, make_request, table


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def base() -> Starlette:
    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])


class PassThrough:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def apps() -> dict[str, Any]:
    bare = base()
    passthrough = base()
    passthrough.add_middleware(PassThrough)
    correlation = base()
    correlation.add_middleware(CorrelationIdMiddleware)
    ours = base()
    ours.add_middleware(ErrorMiddleware)
    ours.add_middleware(RequestContextMiddleware)
    outer = base()  # Starlette: the last added is the outermost
    outer.add_middleware(CancellationMiddleware)
    outer.add_middleware(ErrorMiddleware)
    outer.add_middleware(RequestContextMiddleware)
    return {
        "bare starlette": bare,
        "pure-ASGI pass-through": passthrough,
        "asgi-correlation-id": correlation,
        "aimiddleware context+errors": ours,
        "aimiddleware context+errors+cancellation": outer,
    }


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    request = make_request(
        "POST", "/", body=b'{"prompt": "hello"}', headers=[(b"content-type", b"application/json")]
    )
    contenders = {name: (app, request) for name, app in apps().items()}
    results = await compare(contenders, requests=300 if quick else 2000, rounds=3 if quick else 7)
    return table(
        results, "bare starlette", "context + errors (+ cancellation): per-request cost"
    ), as_json(results, "bare starlette")
