"""The reference app proxying a real upstream: another reference app on a real uvicorn
server, reached through ``examples/upstream.py`` (httpx), with the official ``openai`` SDK
and httpx-sse as clients."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from fastapi import FastAPI
from httpx_sse import connect_sse

from aimiddleware import EventStreamResponse
from aimiddleware.testing import FakeModel
from examples.app import create_app
from examples.upstream import Upstream
from tests.live_server import live_server
from tests.redis_server import free_port
from tests.test_reference_app import write_test_config

HI = [{"role": "user", "content": "Tell me about rate limits"}]
PRO = {"authorization": "Bearer sk-demo-pro"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_config(tmp_path_factory)


@pytest.fixture(scope="module")
def upstream_url(config: Path) -> Iterator[str]:
    model = FakeModel("fake-chat", first_token_latency=0, inter_token_delay=0)
    with live_server(create_app(config, storage="memory://", model=model)) as url:
        yield url + "/v1"


def proxy(config: Path, upstream: str, key: str = "sk-demo-pro") -> FastAPI:
    return create_app(config, storage="memory://", upstream=Upstream(upstream, key))


@pytest.fixture(scope="module")
def proxy_url(config: Path, upstream_url: str) -> Iterator[str]:
    with live_server(proxy(config, upstream_url)) as url:
        yield url


def stream_data(url: str, body: dict[str, object]) -> list[str]:
    with httpx.Client() as client, connect_sse(
        client, "POST", url + "/v1/chat/completions", json=body, headers=PRO
    ) as source:
        assert source.response.status_code == 200
        return [event.data for event in source.iter_sse()]


def test_streams_carry_usage_only_when_asked(proxy_url: str) -> None:
    body = {"model": "fake-chat", "messages": HI, "stream": True, "max_tokens": 12}
    plain = stream_data(proxy_url, body)
    assert plain[-1] == "[DONE]"
    chunks = [json.loads(d) for d in plain[:-1]]
    assert chunks and all("usage" not in c for c in chunks)  # as the upstream sends it

    asked = stream_data(proxy_url, {**body, "stream_options": {"include_usage": True}})
    with_usage = [c for c in map(json.loads, asked[:-1]) if c.get("usage")]
    assert len(with_usage) == 1 and with_usage[0]["choices"] == []
    assert with_usage[0]["usage"]["completion_tokens"] == 12
    # recorded by the proxy either way: two streams of 12 output tokens
    totals = httpx.get(proxy_url + "/v1/usage", headers=PRO).json()["totals"]
    assert totals["requests"] == 2 and totals["output_tokens"] == 24


def test_the_sdk_through_the_proxy(proxy_url: str) -> None:
    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="sk-demo-pro", max_retries=0)
    with client:
        raw = client.chat.completions.with_raw_response.create(model="fake-chat", messages=HI)
        completion = raw.parse()
        assert completion.usage is not None
        assert raw.headers["x-usage-total-tokens"] == str(completion.usage.total_tokens)
        chunks = list(client.chat.completions.create(
            model="fake-chat", messages=HI, stream=True,
            stream_options={"include_usage": True},
        ))
        assert [c for c in chunks if c.usage is not None] == [chunks[-1]]


def test_an_upstream_refusal_is_the_streams_status(config: Path, upstream_url: str) -> None:
    # The proxy's key is a free one upstream (3 requests a second). Its 429 used to reach
    # a streaming client as a 200 and an error event, without the wait.
    with live_server(proxy(config, upstream_url, key="sk-free-user")) as url:
        body = {"model": "fake-chat", "messages": HI, "stream": True, "max_tokens": 4}
        statuses = []
        for _ in range(6):
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=PRO)
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429, statuses
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["error"]["code"] == "upstream_rate_limited"
        # the upstream's wait, kept: its window is one second (its reset rounds up a little)
        assert 0 < float(r.headers["retry-after"]) <= 2
        assert 0 < int(r.headers["retry-after-ms"]) <= 2000


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_is_down_is_a_typed_5xx(config: Path, stream: bool) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with live_server(proxy(config, nowhere)) as url:
        body = {"model": "fake-chat", "messages": HI, "stream": stream}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=PRO)
    assert r.status_code in (502, 503), r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["retryable"] is True


async def test_an_upstream_stream_never_iterated_is_closed(upstream_url: str) -> None:
    # The stream is closed before its first item (a HEAD, a resume answered from the
    # buffer, the client gone): closing an async generator that never started runs none of
    # its code, so the upstream response opened before it stayed open (its connection out
    # of the pool, the upstream generating on).
    up = Upstream(upstream_url, "sk-demo-pro")
    try:
        resp = await up.chat({"model": "fake-chat", "messages": HI, "stream": True})
        assert isinstance(resp, EventStreamResponse)
        upstream_response = resp.iterator.response  # type: ignore[attr-defined]
        assert not upstream_response.is_closed
        await resp.iterator.aclose()  # type: ignore[attr-defined]
        assert upstream_response.is_closed
    finally:
        await up.aclose()


async def test_the_upstream_stream_is_closed_when_the_head_cannot_be_sent(
    upstream_url: str,
) -> None:
    # The client left before our head went out (ASGI >= 2.4: send raises OSError).
    up = Upstream(upstream_url, "sk-demo-pro")
    try:
        resp = await up.chat({"model": "fake-chat", "messages": HI, "stream": True})
        upstream_response = resp.iterator.response

        async def receive() -> dict[str, Any]:
            await anyio.sleep_forever()
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            raise OSError("client gone")

        scope = {"type": "http", "method": "POST", "headers": []}
        with contextlib.suppress(OSError):
            await resp(scope, receive, send)
        assert upstream_response.is_closed
    finally:
        await up.aclose()
