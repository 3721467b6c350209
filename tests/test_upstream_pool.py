"""examples/upstream.py's connection pool: how many upstream streams it holds at once
(``AIMW_UPSTREAM_MAX_CONNECTIONS``), against an upstream on a real uvicorn server whose
streams stay open until the test is done with them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from examples.upstream import Upstream
from tests.live_server import live_server

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
OPEN: list[int] = [0]  # streams the upstream is serving now


async def chat(request: Request) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        OPEN[0] += 1
        try:
            yield 'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
            await asyncio.sleep(60)  # (until the proxy closes the stream)
            yield "data: [DONE]\n\n"
        finally:
            OPEN[0] -= 1

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with live_server(app) as url:
        yield url + "/v1"


async def open_streams(up: Upstream, n: int, within: float) -> list[Any]:
    """Start ``n`` streams at once; those whose head came back within ``within`` seconds
    (the others wait for a pooled connection: cancelled)."""
    opened: list[Any] = []

    async def one() -> None:
        opened.append(await up.chat(REQUEST))

    with anyio.move_on_after(within):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    return opened


async def close(up: Upstream, opened: list[Any]) -> None:
    for response in opened:
        await response.iterator.aclose()
    await up.aclose()
    with anyio.fail_after(5):  # (the upstream sees the disconnects)
        while OPEN[0]:  # noqa: ASYNC110 - a counter in the server's thread, no event
            await anyio.sleep(0.01)


async def test_more_than_100_streams_reach_the_upstream_by_default(upstream_url: str) -> None:
    # httpx's default pool is 100 connections: the 101st stream waited for one (up to the
    # 120 s timeout) while holding its admission, and the upstream never saw it.
    up = Upstream(upstream_url)
    opened = await open_streams(up, 120, within=10)
    try:
        assert len(opened) == 120 and OPEN[0] == 120
    finally:
        await close(up, opened)


async def test_the_pool_size_comes_from_the_environment(
    upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIMW_UPSTREAM_URL", upstream_url)
    monkeypatch.setenv("AIMW_UPSTREAM_MAX_CONNECTIONS", "2")
    up = Upstream.from_env()
    assert up is not None
    opened = await open_streams(up, 3, within=1)
    try:
        assert len(opened) == 2 and OPEN[0] == 2  # (the third waits for a connection)
    finally:
        await close(up, opened)


@pytest.mark.parametrize("value", ["0", "-5", "many", "1.5"])
def test_a_bad_pool_size_fails_at_startup(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AIMW_UPSTREAM_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("AIMW_UPSTREAM_MAX_CONNECTIONS", value)
    with pytest.raises(ValueError, match="AIMW_UPSTREAM_MAX_CONNECTIONS"):
        Upstream.from_env()
    with pytest.raises(ValueError):
        Upstream("http://127.0.0.1:9/v1", max_connections=0)
