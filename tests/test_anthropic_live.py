"""An Anthropic-shaped Messages API behind the whole stack, over real uvicorn: driven by the
official ``anthropic`` SDK (and httpx where a client must leave mid-stream)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from aimiddleware import (
    AnthropicDialect,
    EventStreamResponse,
    Policy,
    PriceTable,
    RateLimiter,
    StackConfig,
    StreamResult,
    TokenCounter,
    Usage,
    UsageConfig,
    UsageRoutes,
    current,
    install,
)
from aimiddleware.context import key_principal
from aimiddleware.usage import MemoryLedger
from tests.live_server import serve

MODEL = "claude-test"
PRICES = PriceTable.from_dict({MODEL: {"input": "3", "output": "15", "cached_input": "0.30"}})
LIMIT = 100_000
WORDS = [f"w{i} " for i in range(40)]
# What the real API opens a stream with: cache reads count as input, output_tokens is a
# placeholder (the count is in the closing message_delta).
START_USAGE = {"input_tokens": 25, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 100, "output_tokens": 1}


def native_events(slow: bool, *, empty: bool = False) -> list[dict[str, Any]]:
    """A whole Messages stream; ``empty``: the model wrote nothing (closing output 0)."""
    words = [] if empty else WORDS
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": MODEL, "stop_reason": None, "stop_sequence": None, "usage": START_USAGE}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events += [{"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": w}} for w in words]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": len(words)}},
        {"type": "message_stop"},
    ]
    return events


def messages_app(contexts: list[Any], ledger: MemoryLedger) -> FastAPI:
    app = FastAPI()
    counter = TokenCounter()

    @app.post("/proxy/v1/messages")
    async def proxy() -> StreamingResponse:
        """Forwards an upstream's event stream as bytes (the usage layer reads it)."""
        contexts.append(current())
        text = json.dumps(current().json())
        slow, empty = "slow" in text, "empty" in text

        async def upstream() -> AsyncIterator[bytes]:
            for event in native_events(slow, empty=empty):
                if slow and event["type"] == "content_block_delta":
                    await anyio.sleep(0.05)
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

        return StreamingResponse(upstream(), media_type="text/event-stream")

    @app.post("/dialect/v1/messages")
    async def dialect() -> EventStreamResponse:
        """Native events through AnthropicDialect; "bare": text deltas and no usage at all."""
        contexts.append(current())
        text = json.dumps(current().json())
        slow = "slow" in text

        async def events() -> AsyncIterator[Any]:
            if "bare" in text:
                for word in WORDS[:3]:
                    yield word
                return
            if "sequence" in text:  # the output ended on a stop sequence the endpoint names
                for word in WORDS[:3]:
                    yield word
                yield StreamResult(usage=Usage(input_tokens=9, output_tokens=4),
                                   finish_reason="stop", stop_sequence="###")
                return
            for event in native_events(slow, empty="empty" in text):
                if slow and event["type"] == "content_block_delta":
                    await anyio.sleep(0.05)
                yield event

        return EventStreamResponse(events(), dialect=AnthropicDialect(MODEL))

    @app.post("/v1/messages")
    async def messages() -> dict[str, Any]:
        contexts.append(current())
        return {"id": "msg_2", "type": "message", "role": "assistant", "model": MODEL,
                "content": [{"type": "text", "text": "hi"}], "stop_reason": "max_tokens",
                "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 1}}

    @app.post("/probe")
    async def probe() -> dict[str, Any]:
        return {}

    app.router.routes.extend(UsageRoutes(usage_path="/v1/usage", ledger=ledger).routes)
    limiter = RateLimiter(
        {"default": Policy(tokens=f"{LIMIT}/minute"), "tight": Policy(requests="1/second"),
         "poor": Policy(cost="0.0001/day")},
        default_tier="default",
        tier={key_principal(b"sk-tight"): "tight", key_principal(b"sk-poor"): "poor"},
        prices=PRICES, counter=counter,
    )
    return install(app, StackConfig(  # type: ignore[no-any-return]
        ratelimit=limiter, ratelimit_exempt=("/v1/usage*",), request_id_header="request-id",
        usage=UsageConfig(prices=PRICES, counter=counter, ledger=ledger),
    ))


async def wait_until(check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + 5
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        await anyio.sleep(0.02)


async def remaining_tokens(http: httpx.AsyncClient, key: str, expected: int) -> int:
    """The key's tokens left this minute, read from requests that reserve none, until they
    are ``expected`` (the reconciliation runs just after the response ends)."""
    deadline = time.monotonic() + 5
    while True:
        r = await http.post("/probe", headers={"x-api-key": key})
        left = int(r.headers["x-ratelimit-remaining-tokens"])
        if left == expected or time.monotonic() > deadline:
            return left
        await anyio.sleep(0.02)


async def leave_after_three_deltas(http: httpx.AsyncClient, path: str, body: dict[str, Any],
                                   key: str) -> None:
    async with http.stream("POST", path, json=body, headers={"x-api-key": key}) as r:
        assert r.status_code == 200
        seen = b""
        async for chunk in r.aiter_bytes():
            seen += chunk
            if seen.count(b"event: content_block_delta") >= 3:
                break


@pytest.mark.parametrize("path", ["/proxy/v1/messages", "/dialect/v1/messages"])
async def test_a_stream_cut_before_its_message_delta_keeps_its_reservation(path: str) -> None:
    """message_start's output_tokens is a placeholder: a client that reads the answer and
    leaves before message_delta must not be charged one output token for it."""
    contexts: list[Any] = []
    ledger = MemoryLedger()
    body = {"model": MODEL, "max_tokens": 2000, "stream": True,
            "messages": [{"role": "user", "content": "slow please"}]}
    reserved = TokenCounter().count_request(body, MODEL).tokens + 2000
    key = "sk-cut"
    async with serve(messages_app(contexts, ledger)) as url, httpx.AsyncClient(
        base_url=url
    ) as http:
        await leave_after_three_deltas(http, path, body, key)
        ctx = contexts[0]
        assert await wait_until(lambda: ctx.raw_finish_reason == "cancelled")
        assert ctx.usage is None  # it reported none: the opening usage is not what it used
        assert await remaining_tokens(http, key, LIMIT - reserved) == LIMIT - reserved
        row = (await http.get(f"/v1/usage/requests/{ctx.request_id}",
                              headers={"x-api-key": key})).json()["record"]
        assert row["usage"]["total_tokens"] == 0  # the history records only usage reported
        assert row["finish_reason"] == "cancelled"


@pytest.mark.parametrize("path", ["/proxy/v1/messages", "/dialect/v1/messages"])
async def test_anthropic_stream_usage_counts_cache_reads_through_the_sdk(path: str) -> None:
    contexts: list[Any] = []
    ledger = MemoryLedger()
    async with serve(messages_app(contexts, ledger)) as url:
        client = anthropic.AsyncAnthropic(base_url=url + path.removesuffix("/v1/messages"),
                                          api_key="sk-cache", max_retries=0)
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        await client.close()
        assert text == "".join(WORDS)
        assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (25, 100)
        assert final.stop_reason == "end_turn"
        ctx = contexts[0]
        expected = Usage.from_anthropic({**START_USAGE, "output_tokens": len(WORDS)})
        assert (expected.input_tokens, expected.cached_input_tokens) == (125, 100)
        assert await wait_until(lambda: ctx.finish_reason == "stop")
        assert ctx.usage == expected and ctx.raw_finish_reason == "end_turn"
        assert ctx.estimated_cost == PRICES.estimate(MODEL, expected)


@pytest.mark.parametrize("path", ["/proxy/v1/messages", "/dialect/v1/messages"])
async def test_a_closing_output_of_zero_is_not_the_opening_placeholder(path: str) -> None:
    """message_start's output_tokens (1) is a placeholder, not a lower bound: a stream whose
    message_delta says 0 output tokens used 0, and is priced and counted so."""
    contexts: list[Any] = []
    async with serve(messages_app(contexts, MemoryLedger())) as url:
        client = anthropic.AsyncAnthropic(base_url=url + path.removesuffix("/v1/messages"),
                                          api_key="sk-empty", max_retries=0)
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "empty"}]
        ) as stream:
            final = await stream.get_final_message()
        await client.close()
        assert final.usage.output_tokens == 0
        assert [block.text for block in final.content if block.type == "text"] == [""]
        ctx = contexts[0]
        assert await wait_until(lambda: ctx.finish_reason == "stop")
        expected = Usage.from_anthropic({**START_USAGE, "output_tokens": 0})
        assert ctx.usage == expected
        assert (ctx.usage.output_tokens, ctx.usage.total_tokens) == (0, 125)
        assert ctx.estimated_cost == PRICES.estimate(MODEL, expected)


async def test_a_dialect_stream_names_the_stop_sequence_it_ended_on() -> None:
    contexts: list[Any] = []
    async with serve(messages_app(contexts, MemoryLedger())) as url:
        client = anthropic.AsyncAnthropic(base_url=url + "/dialect", api_key="sk-seq",
                                          max_retries=0)
        async with client.messages.stream(
            model=MODEL, max_tokens=100, stop_sequences=["###"],
            messages=[{"role": "user", "content": "sequence"}],
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        await client.close()
        assert text == "".join(WORDS[:3])
        assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "###")
        assert final.usage.output_tokens == 4
        ctx = contexts[0]
        assert await wait_until(lambda: ctx.finish_reason == "stop")


async def test_an_anthropic_dialect_stream_without_usage_reports_none() -> None:
    """Text deltas and no StreamResult: the dialect's end still writes a valid message_delta
    (end_turn, the count it must carry), which the stack does not take for usage."""
    contexts: list[Any] = []
    ledger = MemoryLedger()
    body = {"model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": "bare"}]}
    reserved = TokenCounter().count_request(body, MODEL).tokens + 300
    async with serve(messages_app(contexts, ledger)) as url, httpx.AsyncClient(
        base_url=url
    ) as http:
        client = anthropic.AsyncAnthropic(base_url=url + "/dialect", api_key="sk-bare",
                                          max_retries=0)
        async with client.messages.stream(**body) as stream:  # type: ignore[arg-type]
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        await client.close()
        assert text == "".join(WORDS[:3])
        assert final.stop_reason == "end_turn"  # an Anthropic value, not the normalized "stop"
        ctx = contexts[0]
        assert await wait_until(lambda: ctx.finish_reason == "stop")
        assert ctx.usage is None
        expected = LIMIT - reserved
        assert await remaining_tokens(http, "sk-bare", expected) == expected


async def test_limiter_errors_reach_the_anthropic_sdk_as_its_own() -> None:
    """429 -> RateLimitError retried after retry-after-ms; a quota (x-should-retry: false)
    is not retried; error.message and error.type read as the SDK reads Anthropic's; the
    request id as ``request-id`` (the header the SDK reads)."""
    attempts: list[int] = []

    async def hook(response: httpx2.Response) -> None:
        attempts.append(response.status_code)

    hooks = {"response": [hook]}
    async with serve(messages_app([], MemoryLedger())) as url:
        http = httpx2.AsyncClient(event_hooks=hooks)
        client = anthropic.AsyncAnthropic(base_url=url, api_key="sk-tight", http_client=http)
        msg = [{"role": "user", "content": "hi"}]
        await client.messages.create(model=MODEL, max_tokens=5, messages=msg)  # type: ignore[arg-type]
        started = time.monotonic()
        got = await client.messages.create(model=MODEL, max_tokens=5, messages=msg)  # type: ignore[arg-type]
        assert got.stop_reason == "max_tokens" and got.usage.input_tokens == 9
        assert attempts == [200, 429, 200]
        assert time.monotonic() - started >= 0.5  # waited for the window, not at once
        try:
            await client.with_options(max_retries=0).messages.create(
                model=MODEL, max_tokens=5, messages=msg)  # type: ignore[arg-type]
        except anthropic.RateLimitError as exc:
            assert exc.type == "rate_limit_error"
            assert exc.api_message is not None and exc.api_message.startswith("Requests limit")
            assert exc.request_id is not None and exc.request_id.startswith("req_")
        else:
            raise AssertionError("no RateLimitError")
        attempts.clear()
        poor = client.with_options(api_key="sk-poor")
        with pytest.raises(anthropic.RateLimitError) as info:
            await poor.messages.create(model=MODEL, max_tokens=5000, messages=msg)  # type: ignore[arg-type]
        assert attempts == [429]
        assert info.value.response.headers["x-should-retry"] == "false"
        await client.close()
