"""Apps for the idempotency tests; ``create_app`` is also served by uvicorn subprocesses.

Handler runs are counted with ``INCR`` on the test Redis when ``AIMW_TEST_REDIS`` is set
(so several worker processes share one count), else in the returned ``Counter``.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from aimiddleware import (
    EventStreamResponse,
    IdempotencyConfig,
    StackConfig,
    Storage,
    UpstreamUnavailable,
    install,
)


def build(storage: Storage | str, **options: Any) -> tuple[FastAPI, Counter[str]]:
    counts: Counter[str] = Counter()
    storage = Storage.coerce(storage)
    redis_url = os.environ.get("AIMW_TEST_REDIS")
    app = FastAPI()

    async def count(name: str) -> int:
        counts[name] += 1
        if redis_url is not None:
            return int(await storage.redis.incr(f"test:count:{name}"))
        return counts[name]

    @app.post("/chat")
    async def chat(request: Request) -> Response:
        n = await count("chat")
        await asyncio.sleep(float(request.query_params.get("delay", "0")))
        if request.query_params.get("hold") and redis_url is not None:
            while not await storage.redis.exists("test:release"):  # noqa: ASYNC110 - the test sets it
                await asyncio.sleep(0.01)
        if n == 1 and request.query_params.get("hang_first"):
            await asyncio.sleep(60)  # the SIGKILL test kills the worker meanwhile
        body = await request.body()
        return JSONResponse(
            {"run": n, "echo": body.decode()}, status_code=201, headers={"x-model": "fake-1"}
        )

    @app.get("/pid")
    async def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @app.post("/boom")
    async def boom() -> Response:
        if await count("boom") == 1:
            raise RuntimeError("model crashed")
        return JSONResponse({"ok": True})

    @app.post("/status/{code}")
    async def status(code: int) -> Response:
        await count(f"status{code}")
        return JSONResponse({"code": code}, status_code=code)

    @app.post("/stream")
    async def stream(request: Request) -> Response:
        run = await count("stream")
        events = int(request.query_params.get("n", "3"))
        fail_at = int(request.query_params.get("fail_at", "-1"))

        async def gen() -> Any:
            for i in range(events):
                if i == fail_at and run == 1:  # only the first attempt breaks
                    raise RuntimeError("stream broke")
                yield f"id: {i}\nevent: delta\ndata: {{\"i\": {i}}}\n\n"
                await asyncio.sleep(0)

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/sse")
    async def sse(request: Request) -> Response:
        # An EventStreamResponse whose source fails on the first attempt after one event:
        # the client gets a 200, the event, then an error event ending the stream.
        run = await count("sse")

        async def gen() -> Any:
            yield "first"
            if run == 1:
                raise UpstreamUnavailable()
            yield "second"

        return EventStreamResponse(gen())

    install(app, StackConfig(storage=storage, idempotency=IdempotencyConfig(**options)))
    return app, counts


def create_app() -> FastAPI:
    """Uvicorn factory for the multi-process tests."""
    url = os.environ["AIMW_TEST_REDIS"]
    lease = float(os.environ.get("AIMW_TEST_LEASE", "60"))
    app, _ = build(url, secret="shared-test-secret-0123456789", lease_seconds=lease)
    return app
