"""The stack in front of Starlette's CORSMiddleware (install() called last): a browser's
preflight is not a request for the limiter to count or refuse."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aimiddleware
from aimiddleware import Policy, StackConfig, Storage
from aimiddleware.context_middleware import RequestContextMiddleware
from aimiddleware.error_middleware import ErrorMiddleware
from aimiddleware.ratelimit.middleware import RateLimitMiddleware

ORIGIN = "https://app.example"
PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type"}


async def chat(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def _app(storage: Storage, fused: bool) -> Starlette:
    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
    app.add_middleware(CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["POST"],
                       allow_headers=["authorization", "content-type"])
    policy = Policy(requests="2/minute")
    if fused:
        aimiddleware.install(app, StackConfig(storage=storage, ratelimit=policy))
    else:
        app.add_middleware(RateLimitMiddleware, policy, storage=storage)
        app.add_middleware(ErrorMiddleware)
        app.add_middleware(RequestContextMiddleware)
    return app


@pytest.mark.parametrize("fused", [True, False], ids=["install", "chained"])
async def test_preflights_are_neither_counted_nor_refused(storage: Storage, fused: bool) -> None:
    # Each preflight (no credentials: the client address's bucket, shared behind a NAT) was
    # charged, and the third was a 429 without CORS headers: the browser then reported a
    # CORS failure for the real request.
    transport = httpx.ASGITransport(_app(storage, fused))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for _ in range(5):
            pre = await c.options("/v1/chat", headers=PREFLIGHT)
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == ORIGIN
            assert "x-ratelimit-limit-requests" not in pre.headers
        auth = {"origin": ORIGIN, "authorization": "Bearer k"}
        statuses = [(await c.post("/v1/chat", headers=auth, json={})).status_code
                    for _ in range(3)]
        # (a plain OPTIONS, not a preflight, is an ordinary request: limited)
        plain = await c.options("/v1/chat", headers={"authorization": "Bearer k"})
    assert statuses == [200, 200, 429]
    assert plain.status_code == 429
