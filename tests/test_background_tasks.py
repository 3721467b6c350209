"""What the layers do once a response is out while the app still runs its background tasks.

FastAPI (and Starlette's ``BackgroundTasks``) run background tasks after the response's
last body message and before the app returns. A rate-limited request's concurrency slot and
reservation must not wait for them (LiteLLM's "held during deferred logging" fault), and an
idempotency record completed by that response has no lease left to renew.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI

import aimiddleware
from aimiddleware import (
    ErrorMiddleware,
    IdempotencyConfig,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    RequestContextMiddleware,
    report_usage,
)
from aimiddleware.storage import Storage
from tests.live_server import serve
from tests.ratelimit_helpers import counters, principal_of

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}


def app_with_background_work(limiter: RateLimiter, mode: str, done: anyio.Event) -> Any:
    """Each response starts a background task that runs until ``done`` is set."""
    app = FastAPI()

    @app.post(CHAT)
    async def chat(tasks: BackgroundTasks) -> dict[str, Any]:
        tasks.add_task(done.wait)  # (deferred logging, a webhook, a cache write...)
        await anyio.sleep(0.25)  # long enough for a shared store's lease refresher to start
        report_usage({"input_tokens": 8, "output_tokens": 2}, model="gpt-4o-mini")
        return {"ok": True}

    if mode == "chained":
        return RequestContextMiddleware(ErrorMiddleware(RateLimitMiddleware(app, limiter=limiter)))
    # ("keyed": a request with an Idempotency-Key leaves the fused stack for the chained
    # layers from idempotency inward)
    aimiddleware.install(
        app, ratelimit=limiter, idempotency=IdempotencyConfig() if mode == "keyed" else None
    )
    return app


@pytest.mark.parametrize("mode", ["install", "keyed", "chained"])
async def test_background_tasks_hold_neither_the_slot_nor_the_reservation(
    storage: Storage, mode: str
) -> None:
    # lease_ttl 0.3 s: a shared store's lease is refreshed every 0.1 s while the call runs
    limiter = RateLimiter(
        Policy(requests="100/minute", tokens="100000/minute", concurrency=1),
        storage=storage, lease_ttl=0.3,
    )
    done = anyio.Event()
    app = app_with_background_work(limiter, mode, done)
    principal = principal_of("k1")

    async def slot_freed() -> None:  # (the release follows the body by one store call)
        with anyio.fail_after(2):
            while await limiter.backend.in_flight(principal):  # type: ignore[attr-defined]  # noqa: ASYNC110
                await anyio.sleep(0.01)

    async with serve(app) as url, httpx.AsyncClient(
        base_url=url, headers={"authorization": "Bearer k1"}
    ) as c:
        try:
            first = await c.post(CHAT, json=BODY, headers={"idempotency-key": "a"})
            assert first.status_code == 200
            # Its background task still runs: the slot is free, the tokens reconciled.
            await slot_freed()
            assert (await counters(limiter, "k1"))["tokens:60"] == 10
            # Past several refresh intervals: a refresher left running would have put
            # the released lease back.
            await anyio.sleep(0.45)
            assert await limiter.backend.in_flight(principal) == 0  # type: ignore[attr-defined]
            second = await c.post(CHAT, json=BODY, headers={"idempotency-key": "b"})
            assert second.status_code == 200, second.text
            await slot_freed()
            assert (await counters(limiter, "k1"))["tokens:60"] == 20
        finally:
            done.set()


async def test_a_completed_idempotency_record_is_not_renewed_during_background_tasks(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    # The heartbeat renewed the lease every interval until the app returned: once the
    # record was completed, its first beat found no lease and warned "lease lost while the
    # request was running" about a request that had succeeded.
    app = FastAPI()
    runs: list[str] = []

    @app.post(CHAT)
    async def chat(tasks: BackgroundTasks) -> dict[str, Any]:
        runs.append("run")
        tasks.add_task(anyio.sleep, 0.5)  # five heartbeat intervals after the response
        return {"ok": True}

    aimiddleware.install(app, storage=storage, idempotency=IdempotencyConfig(
        lease_seconds=0.6, heartbeat_seconds=0.1))
    headers = {"authorization": "Bearer k1", "idempotency-key": "k-bg"}
    caplog.set_level(logging.WARNING, logger="aimiddleware.idempotency")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        first = await c.post(CHAT, json=BODY, headers=headers)
        again = await c.post(CHAT, json=BODY, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and runs == ["run"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aimiddleware")] == []


@pytest.mark.parametrize("route", ["streaming-response", "events"])
async def test_a_foreign_streams_record_is_written_once_its_background_tasks_end(
    storage: Storage, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    """A keyed stream of undeclared length is stored once the app returns, so an exception
    raised after its last message (as an ``@app.middleware("http")`` function re-raises
    the endpoint's iterator's) releases the key (tests/test_basehttp_middleware.py): a
    ``StreamingResponse`` whose background task still runs is in flight meanwhile, a retry
    gets the retryable 409 (the lease kept alive past its 0.6 s), then the replay. An
    ``EventStreamResponse`` that ran its course says so, and is stored at its end, as
    before: a retry at once is the replay."""
    from fastapi.responses import StreamingResponse

    from aimiddleware import EventStreamResponse, OpenAIChatDialect

    app = FastAPI()
    runs: list[str] = []
    done = anyio.Event()

    @app.post(CHAT)
    async def chat(body: dict[str, Any], tasks: BackgroundTasks) -> Any:
        runs.append("run")
        tasks.add_task(done.wait)

        async def tokens() -> Any:
            for i in range(3):
                yield f"t{i} "

        if route == "events":
            return EventStreamResponse(tokens(), dialect=OpenAIChatDialect.for_request(body))

        async def sse() -> Any:
            async for token in tokens():
                yield f"data: {token}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    aimiddleware.install(app, storage=storage, idempotency=IdempotencyConfig(
        lease_seconds=0.6, heartbeat_seconds=0.1))
    headers = {"authorization": "Bearer k1", "idempotency-key": "k-stream"}
    caplog.set_level(logging.WARNING, logger="aimiddleware.idempotency")
    async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=headers) as c:
        first = await c.post(CHAT, json=BODY)
        assert first.status_code == 200 and "[DONE]" in first.text
        await anyio.sleep(1.0)  # the background task still runs, past the lease's 0.6 s
        again = await c.post(CHAT, json=BODY)
        if route == "events":
            assert again.headers["idempotent-replayed"] == "true"
        else:
            assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
            done.set()
            with anyio.fail_after(3):
                while again.status_code == 409:
                    await anyio.sleep(0.05)
                    again = await c.post(CHAT, json=BODY)
            assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        done.set()
    assert runs == ["run"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aimiddleware")] == []
