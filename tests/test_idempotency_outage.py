"""An idempotent answer whose record cannot be written (the store is down at that moment)
is stored when the store is back, not left claimed: a retry replays it."""

from __future__ import annotations

import signal

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import IdempotencyConfig, Storage, install
from tests.live_server import serve
from tests.redis_server import RedisServer


async def test_a_record_that_could_not_be_written_is_stored_when_the_store_is_back() -> None:
    # The client got its 200, the record was never written, and the claim stayed: a retry
    # was a 409 for the whole lease (60 s), then ran the model a second time.
    store = RedisServer().start()
    calls = 0
    release = anyio.Event()
    running = anyio.Event()

    async def generate(request: Request) -> JSONResponse:
        nonlocal calls
        calls += 1
        running.set()
        await release.wait()
        return JSONResponse({"text": "expensive", "call": calls})

    storage = Storage(store.url, socket_timeout=0.3)
    app = Starlette(routes=[Route("/v1/generate", generate, methods=["POST"])])
    install(app, storage=storage, idempotency=IdempotencyConfig(secret="s" * 16))
    headers = {"authorization": "Bearer k", "idempotency-key": "once"}
    assert store.proc is not None
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            async with anyio.create_task_group() as tg:
                first: list[httpx.Response] = []

                async def call() -> None:
                    first.append(await c.post("/v1/generate", json={}, headers=headers))

                tg.start_soon(call)
                await running.wait()  # claimed; the store goes away before the answer
                store.proc.send_signal(signal.SIGSTOP)
                release.set()
            assert first[0].status_code == 200 and first[0].json()["call"] == 1
            await anyio.sleep(0.5)
            store.proc.send_signal(signal.SIGCONT)
            with anyio.fail_after(10):
                while True:
                    again = await c.post("/v1/generate", json={}, headers=headers)
                    if again.status_code != 503:  # (a stale pooled connection fails once)
                        break
                    await anyio.sleep(0.1)
                while again.status_code == 409:  # the record is on its way
                    await anyio.sleep(0.1)
                    again = await c.post("/v1/generate", json={}, headers=headers)
            assert again.status_code == 200, again.text
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == {"text": "expensive", "call": 1}
            assert calls == 1
    finally:
        store.proc.send_signal(signal.SIGCONT)
        await storage.aclose()
        store.stop()
