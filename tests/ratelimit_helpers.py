"""Shared pieces of the rate-limit tests: an app whose endpoint does what the body says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import aimiddleware
from aimiddleware import RateLimiter, report_usage
from aimiddleware.pricing import PriceTable
from aimiddleware.ratelimit.backend import Hit, WindowState
from aimiddleware.sse import EventStreamResponse, OpenAIChatDialect

PRICES = PriceTable({"gpt-4o-mini": {"input": "0.15", "output": "0.60"}})


def make_app(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        await asyncio.sleep(float(body.get("sleep", 0)))
        if body.get("fail") == "raise":
            raise RuntimeError("model client blew up")
        if body.get("fail") == "status":
            return JSONResponse({"error": "bad"}, status_code=502)
        if "usage" in body:
            report_usage(body["usage"], model=body.get("model"))
        if body.get("stream"):  # a slow stream that reports no usage
            return EventStreamResponse(_deltas(int(body["stream"])), dialect=OpenAIChatDialect())
        return {"ok": True}

    @app.post("/v1/embeddings")
    @app.post("/api/embed")
    async def embed(request: Request) -> Any:
        await request.body()
        return {"ok": True}

    @app.get("/ping")
    async def ping() -> JSONResponse:
        # An app that sets its own rate-limit header: the layer must not duplicate it.
        return JSONResponse({"ok": True}, headers={"x-ratelimit-limit-requests": "999"})

    aimiddleware.install(app, ratelimit=limiter)
    return app


async def _deltas(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"token{i} "
        await asyncio.sleep(0.01)


def client(app: FastAPI, key: str = "k1") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://test",
        headers={"authorization": f"Bearer {key}"},
    )


def principal_of(key: str) -> str:
    import hashlib

    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:32]


async def counters(limiter: RateLimiter, key: str, tier: str = "default") -> dict[str, int]:
    """What every limit of ``tier`` holds for the caller with API key ``key`` (current plus
    previous fixed window, so a window boundary during a test changes nothing)."""
    limits = limiter.policies[tier].limits
    hits = [Hit(lim.field, lim.window * 1000, lim.amount, 0) for lim in limits]
    states: tuple[WindowState, ...] = await limiter.backend.peek(principal_of(key), hits)
    return {lim.field: st.prev + st.curr for lim, st in zip(limits, states, strict=True)}
