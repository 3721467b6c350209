"""A FastAPI app for the rate-limit tests, configured from environment variables.

AIMW_RL_STORAGE (storage URL), AIMW_RL_POLICY (JSON of Policy kwargs), AIMW_RL_LEASE_TTL,
AIMW_RL_FAIL_OPEN ("1"). Run with ``uvicorn tests.ratelimit_app:app``. A body with
``"stream": seconds`` streams a token every 0.1 s for that long (no usage reported).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request

import aimiddleware
from aimiddleware import Policy, RateLimiter, report_usage
from aimiddleware.sse import EventStreamResponse, OpenAIChatDialect

policy = Policy(**json.loads(os.environ.get("AIMW_RL_POLICY", '{"requests": "100/day"}')))
limiter = RateLimiter(
    policy,
    storage=os.environ.get("AIMW_RL_STORAGE", "memory://"),
    lease_ttl=float(os.environ.get("AIMW_RL_LEASE_TTL", "30")),
    fail_open=os.environ.get("AIMW_RL_FAIL_OPEN") == "1",
)
app = FastAPI()
aimiddleware.install(app, ratelimit=limiter)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    body = await request.json()
    if body.get("stream"):
        return EventStreamResponse(_tokens(float(body["stream"])), dialect=OpenAIChatDialect())
    admission = aimiddleware.current().state["ratelimit"]
    est = admission.estimate
    await asyncio.sleep(float(body.get("sleep", 0)))
    report_usage({"input_tokens": est.input_tokens, "output_tokens": est.output_tokens})
    return {"pid": os.getpid(), "input": est.input_tokens, "output": est.output_tokens}


async def _tokens(seconds: float) -> AsyncIterator[str]:
    for i in range(int(seconds * 10)):
        yield f"token{i} "
        await asyncio.sleep(0.1)


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}
