"""UsageMiddleware: usage from endpoints, JSON bodies and streams; headers, cost, ledger."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from aimiddleware import (
    Completion,
    MemoryLedger,
    PriceTable,
    StackConfig,
    Usage,
    UsageConfig,
    UsageMiddleware,
    envelope,
    install,
    report_usage,
)
from aimiddleware.context_middleware import RequestContextMiddleware
from tests.ratelimit_helpers import principal_of
from tests.redis_server import free_port
from tests.test_usage_models import ANTHROPIC, GEMINI, OPENAI_CHAT

PRICES = PriceTable({
    "gpt-4o": {"input": "2.5", "output": "10", "cached_input": "1.25"},
    "claude-sonnet-4-5": {"input": 3, "output": 15, "cached_input": "0.3",
                          "cache_creation": "3.75"},
    "gemini-2.5-flash": {"input": "0.3", "output": "2.5"},
})


def json_route(sample: dict[str, Any]) -> Any:
    async def endpoint(request: Request) -> Response:
        return JSONResponse(sample)

    return endpoint


async def reported(request: Request) -> Response:
    report_usage({"input_tokens": 40, "output_tokens": 2}, finish_reason="end_turn",
                 model="claude-sonnet-4-5")
    return PlainTextResponse("ok")


def sse_lines(events: list[dict[str, Any]]) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


STREAM_EVENTS = [
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
     "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}},
]


async def stream(request: Request) -> Response:
    async def gen() -> AsyncIterator[bytes]:
        for line in sse_lines(STREAM_EVENTS):
            yield line

    return StreamingResponse(gen(), media_type="text/event-stream")


def make_app(ledger: MemoryLedger, **usage: Any) -> Any:
    app = Starlette(routes=[
        Route("/openai", json_route(OPENAI_CHAT), methods=["POST"]),
        Route("/anthropic", json_route(ANTHROPIC), methods=["POST"]),
        Route("/gemini", json_route(GEMINI), methods=["POST"]),
        Route("/reported", reported, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/plain", lambda r: JSONResponse({"hello": "world"}), methods=["GET"]),
    ])
    return install(app, StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger, **usage)))


def event_stream_app(chunks: list[bytes]) -> Any:
    """An ASGI app sending ``chunks`` as one event stream, one body message each."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@pytest.fixture
def ledger() -> MemoryLedger:
    return MemoryLedger()


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_openai_json_body_gives_headers_cost_and_record(ledger: MemoryLedger) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/openai", json={"model": "gpt-4o", "messages": []},
                         headers={"authorization": "Bearer k1"})
    assert r.json() == OPENAI_CHAT  # body untouched
    h = r.headers
    assert (h["x-usage-input-tokens"], h["x-usage-output-tokens"]) == ("1117", "46")
    assert (h["x-usage-total-tokens"], h["x-usage-cached-input-tokens"]) == ("1163", "1024")
    assert h["x-usage-reasoning-tokens"] == "10" and h["x-usage-finish-reason"] == "length"
    cost = (93 * Decimal("2.5") + 1024 * Decimal("1.25") + 46 * Decimal(10)) / 1_000_000
    assert Decimal(h["x-usage-estimated-cost"]) == cost
    assert float(h["x-usage-duration-ms"]) >= 0
    got = await ledger.get_request(ledger_principal(ledger), r.headers["x-request-id"])
    assert got is not None
    assert got.record.model == "gpt-4o" and got.record.model_version == "gpt-4o-2024-08-06"
    assert got.record.raw_finish_reason == "length" and got.record.finish_reason == "length"
    assert got.record.estimated_cost == cost and got.record.status == 200


def ledger_principal(ledger: MemoryLedger) -> str:
    [(principal, _)] = {k for k in ledger._requests}  # one request was made
    return principal


@pytest.mark.parametrize(
    ("path", "inp", "out", "reason", "cost"),
    [
        ("/anthropic", 189607, 393, "stop",
         (21 * 3 + Decimal("1500") * Decimal("0.3") + 188086 * Decimal("3.75") + 393 * 15)
         / 1_000_000),
        ("/gemini", 1220, 310, "length",
         (1220 * Decimal("0.3") + 310 * Decimal("2.5")) / 1_000_000),
    ],
)
async def test_anthropic_and_gemini_bodies(
    ledger: MemoryLedger, path: str, inp: int, out: int, reason: str, cost: Decimal
) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post(path, json={"model": "whatever-alias"})
    assert int(r.headers["x-usage-input-tokens"]) == inp
    assert int(r.headers["x-usage-output-tokens"]) == out
    assert r.headers["x-usage-finish-reason"] == reason
    assert Decimal(r.headers["x-usage-estimated-cost"]) == cost  # priced by served version


async def test_report_usage_from_the_endpoint(ledger: MemoryLedger) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/reported", content=b"{}")
    assert r.text == "ok"
    assert r.headers["x-usage-input-tokens"] == "40"
    assert r.headers["x-usage-finish-reason"] == "stop"
    assert Decimal(r.headers["x-usage-estimated-cost"]) == (40 * 3 + 2 * 15) / Decimal(10**6)
    [row] = await ledger.query(ledger_principal(ledger))
    assert row.model == "claude-sonnet-4-5" and row.finish_reasons == {"stop": 1}


async def test_unpriced_model_has_no_cost_header(ledger: MemoryLedger) -> None:
    app = install(Starlette(routes=[Route("/r", reported, methods=["POST"])]),
                  StackConfig(usage=UsageConfig(ledger=ledger)))
    async with client(app) as c:
        r = await c.post("/r")
    assert "x-usage-estimated-cost" not in r.headers and r.headers["x-usage-input-tokens"] == "40"
    [row] = await ledger.query(ledger_principal(ledger))
    assert row.unpriced_requests == 1


async def test_non_ai_routes_are_not_recorded(ledger: MemoryLedger) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.get("/plain")
    assert r.json() == {"hello": "world"} and "x-usage-input-tokens" not in r.headers
    assert "x-usage-duration-ms" in r.headers
    assert len(ledger._requests) == 0


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(dict(message))


def scope_for(path: str, body: bytes = b"{}") -> tuple[dict[str, Any], Any]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    return scope, receive


async def test_streams_pass_through_unbuffered_and_are_recorded_at_the_end() -> None:
    ledger = MemoryLedger()
    rec = Recorder()
    seen_downstream: list[int] = []
    lines = sse_lines(STREAM_EVENTS)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for line in lines:
            seen_downstream.append(len(rec.messages))  # what already reached the server
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw = RequestContextMiddleware(UsageMiddleware(app, prices=PRICES, ledger=ledger))
    scope, receive = scope_for("/stream", b'{"model": "gpt-4o"}')
    await mw(scope, receive, rec)
    # each chunk reached the server before the next was produced: nothing was held back
    assert seen_downstream == list(range(1, len(lines) + 1))
    starts = [m for m in rec.messages if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert b"".join(m.get("body", b"") for m in rec.messages) == b"".join(lines)
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert (row.input_tokens, row.output_tokens, row.finish_reasons) == (12, 3, {"stop": 1})
    assert row.estimated_cost == (12 * Decimal("2.5") + 3 * 10) / 1_000_000


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"], ids=["crlf", "cr"])
async def test_a_stream_with_cr_line_endings_is_read_for_usage(ending: bytes) -> None:
    # SSE lines may end in CRLF, LF or a lone CR; the scan split on LF only, so a CR-only
    # stream was one endless line: its usage was never read. Cut every 7 bytes, so some
    # CRLF pairs are split across chunks too.
    ledger = MemoryLedger()
    body = b"".join(sse_lines(STREAM_EVENTS)).replace(b"\n", ending)
    app = event_stream_app([body[i:i + 7] for i in range(0, len(body), 7)])
    rec = Recorder()
    mw = RequestContextMiddleware(UsageMiddleware(app, prices=PRICES, ledger=ledger))
    scope, receive = scope_for("/stream", b'{"model": "gpt-4o"}')
    await mw(scope, receive, rec)
    assert b"".join(m.get("body", b"") for m in rec.messages) == body  # passed as it came
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert (row.input_tokens, row.output_tokens, row.finish_reasons) == (12, 3, {"stop": 1})


async def test_json_in_chunks_is_held_once_and_replayed_intact() -> None:
    ledger = MemoryLedger()
    rec = Recorder()
    raw = json.dumps(OPENAI_CHAT).encode()
    parts = [raw[:10], raw[10:200], raw[200:]]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(parts) - 1})

    mw = RequestContextMiddleware(UsageMiddleware(app, ledger=ledger))
    scope, receive = scope_for("/x")
    await mw(scope, receive, rec)
    types = [m["type"] for m in rec.messages]
    assert types == ["http.response.start", "http.response.body"]
    assert rec.messages[1]["body"] == raw and rec.messages[1]["more_body"] is False
    headers = dict(rec.messages[0]["headers"])
    assert headers[b"x-usage-total-tokens"] == b"1163"


@pytest.mark.parametrize("nested", [False, True])
async def test_json_over_the_bound_passes_through_with_its_usage_read_from_its_end(
    nested: bool,
) -> None:
    # The body is not parsed; its top-level usage is read from its last bytes (here
    # followed by service_tier and system_fingerprint, as OpenAI sends it). A usage nested
    # in another member is not the answer's: not read.
    ledger = MemoryLedger()
    rec = Recorder()
    big = copy.deepcopy(OPENAI_CHAT)
    big["choices"][0]["message"]["content"] = "x" * 5000
    if nested:
        big["extra"] = {"usage": big.pop("usage")}
    raw = json.dumps(big).encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": raw[:3000], "more_body": True})
        await send({"type": "http.response.body", "body": raw[3000:4500], "more_body": True})
        await send({"type": "http.response.body", "body": raw[4500:], "more_body": False})

    mw = RequestContextMiddleware(UsageMiddleware(app, ledger=ledger, max_json_body=1000))
    scope, receive = scope_for("/x")
    await mw(scope, receive, rec)
    assert [m["type"] for m in rec.messages].count("http.response.start") == 1
    assert b"".join(m.get("body", b"") for m in rec.messages) == raw
    assert b"x-usage-total-tokens" not in dict(rec.messages[0]["headers"])  # (sent before)
    if nested:
        assert len(ledger._requests) == 0
    else:
        [row] = await ledger.query(next(iter(ledger._requests))[0])
        assert (row.input_tokens, row.output_tokens, row.cached_input_tokens) == (1117, 46, 1024)


async def test_a_large_embeddings_answer_is_counted_charged_and_recorded() -> None:
    # An embeddings answer ends with its usage, but past max_json_body (1 MiB: ~130 inputs
    # of 384 floats, ~16 of text-embedding-3-large's 3,072) it was not read: no usage
    # headers, no row in the ledger (the call missing from /usage and its cost), and the
    # limits charged the reservation instead of the usage.
    from aimiddleware import Policy, RateLimiter
    from tests.ratelimit_helpers import counters

    ledger = MemoryLedger()
    limiter = RateLimiter(Policy(tokens="100000/minute"))
    app = FastAPI()
    vector = [-0.03447725623846054] * 384  # (a float as all-MiniLM-L6-v2 gives them)

    @app.post("/v1/embeddings")
    async def embeddings(q: dict[str, Any]) -> dict[str, Any]:
        data = [{"object": "embedding", "index": i, "embedding": vector}
                for i in range(len(q["input"]))]
        usage = {"prompt_tokens": 1234, "total_tokens": 1234}
        return {"object": "list", "data": data, "model": q["model"], "usage": usage}

    async def one_message(scope: Any, receive: Any, send: Any) -> None:  # no content-length
        raw = json.dumps({"object": "list", "data": [{"embedding": vector}] * 200,
                          "model": "text-embedding-3-small",
                          "usage": {"prompt_tokens": 77, "total_tokens": 77}}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": raw})

    app.mount("/raw", one_message)
    install(app, StackConfig(ratelimit=limiter, usage=UsageConfig(prices=PRICES, ledger=ledger)))
    body = {"model": "text-embedding-3-small", "input": ["hello world"] * 200,
            "encoding_format": "float"}
    async with client(app) as c:
        r = await c.post("/v1/embeddings", json=body, headers={"authorization": "Bearer k"})
        assert r.status_code == 200 and len(r.content) > 1024 * 1024
        assert (await counters(limiter, "k")) == {"tokens:60": 1234}  # not the 400 reserved
        raw = await c.post("/raw/", json=body, headers={"authorization": "Bearer k2"})
    [row] = await ledger.query(principal_of("k"))
    assert (row.requests, row.input_tokens, row.output_tokens) == (1, 1234, 0)
    assert raw.headers["x-usage-input-tokens"] == "77"  # held whole: headers too
    assert (await counters(limiter, "k2")) == {"tokens:60": 77}


class Answer(BaseModel):
    city: str
    temperature: float


def fastapi_app(ledger: MemoryLedger) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/answer")
    @envelope
    async def answer(q: dict[str, Any]) -> Completion:
        return Completion(output="Paris is sunny.", finish_reason="end_turn",
                          usage=Usage(input_tokens=10, output_tokens=5),
                          model_version="claude-sonnet-4-5-20250929", provider="anthropic")

    @app.post("/v1/structured")
    @envelope(schema=Answer)
    def structured(q: dict[str, Any]) -> dict[str, Any]:
        return {"output": q["raw"], "finish_reason": "stop",
                "usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    @app.post("/v1/chat/completions")
    async def chat(q: dict[str, Any]) -> dict[str, Any]:
        return OPENAI_CHAT

    return install(app, StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger)))


async def test_envelope_decorator_on_fastapi(ledger: MemoryLedger) -> None:
    async with client(fastapi_app(ledger)) as c:
        r = await c.post("/v1/answer", json={"model": "claude-sonnet-4-5", "seed": 7,
                                             "temperature": 0.2},
                         headers={"x-request-id": "req_env_1"})
    assert r.status_code == 200
    env = r.json()
    assert env["object"] == "envelope" and env["id"].startswith("env_")
    assert env["model"] == "claude-sonnet-4-5"
    assert env["model_version"] == "claude-sonnet-4-5-20250929"
    assert (env["finish_reason"], env["raw_finish_reason"]) == ("stop", "end_turn")
    assert env["usage"]["total_tokens"] == 15 and env["request_id"] == "req_env_1"
    assert Decimal(env["estimated_cost"]) == (10 * 3 + 5 * 15) / Decimal(10**6)
    assert env["sampling"] == {"seed": 7, "temperature": 0.2}
    assert env["request_duration_ms"] >= 0
    assert r.headers["x-usage-estimated-cost"] == env["estimated_cost"]
    got = await ledger.get_request(ledger_principal(ledger), "req_env_1")
    assert got is not None and got.record.raw_finish_reason == "end_turn"


async def test_structured_output_failure_is_reported_beside_raw_output(
    ledger: MemoryLedger,
) -> None:
    async with client(fastapi_app(ledger)) as c:
        ok = await c.post("/v1/structured", json={"raw": '{"city": "Oslo", "temperature": 3}'})
        bad = await c.post("/v1/structured", json={"raw": '{"city": "Oslo", "temperature": "warm'})
    assert ok.json()["parsed"] == {"city": "Oslo", "temperature": 3.0}
    assert ok.json()["parsing_error"] is None
    body = bad.json()
    assert body["parsed"] is None and body["parsing_error"]
    assert body["output"] == '{"city": "Oslo", "temperature": "warm'  # untouched
    assert body["usage"]["input_tokens"] == 3


async def test_openai_sdk_through_a_real_server(ledger: MemoryLedger) -> None:
    import openai

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fastapi_app(ledger), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await anyio.sleep(0.01)
        try:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test",
                                     max_retries=0)
            raw = await sdk.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            completion = raw.parse()
            assert completion.usage is not None and completion.usage.total_tokens == 1163
            assert raw.headers["x-usage-total-tokens"] == "1163"
            assert raw.headers["x-usage-finish-reason"] == "length"
            assert Decimal(raw.headers["x-usage-estimated-cost"]) > 0
            await sdk.close()
        finally:
            server.should_exit = True
    rows = await ledger.query(ledger_principal(ledger))
    assert [r.requests for r in rows] == [1]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_json_body": -1}, {"header_prefix": "X-Bad"}, {"prices": {"gpt": 1}},
     {"ledger": "memory"}],
)
def test_config_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        UsageMiddleware(lambda s, r, se: None, **kwargs)  # type: ignore[arg-type,return-value]


async def test_without_the_context_layer_it_passes_through() -> None:
    rec = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope, receive = scope_for("/x")
    await UsageMiddleware(app, record=False)(scope, receive, rec)
    assert rec.messages[0] == {"type": "http.response.start", "status": 204, "headers": []}


async def test_install_uses_the_shared_storage_for_the_ledger(storage: Any) -> None:
    from aimiddleware import UsageRoutes

    app = Starlette(routes=[Route("/reported", reported, methods=["POST"]),
                            *UsageRoutes().routes])
    install(app, StackConfig(storage=storage, usage=UsageConfig(prices=PRICES)))
    async with client(app) as c:
        r = await c.post("/reported", headers={"authorization": "Bearer k"})
        history = await c.get("/usage", headers={"authorization": "Bearer k"})
    assert r.headers["x-usage-input-tokens"] == "40"
    [row] = history.json()["data"]
    assert (row["model"], row["input_tokens"], row["finish_reasons"]) == (
        "claude-sonnet-4-5", 40, {"stop": 1})


async def test_a_large_answer_names_its_served_model_and_no_finish_reason() -> None:
    # Read from its last 4 KiB, a large answer's usage came without the model that served
    # it (a chat answer names it at its head, an embeddings answer just before its usage):
    # the row had no model_version, and a request naming no model was neither priced nor
    # filed under a model. Its top-level model is now read from its first bytes and from
    # its last; its finish reason, inside choices, stays unknown rather than guessed.
    ledger = MemoryLedger()
    long_chat = copy.deepcopy(OPENAI_CHAT)
    long_chat["choices"][0]["message"]["content"] = "x" * (1 << 20)
    nested = {"id": "chatcmpl-2", "meta": {"model": "gpt-4o-2024-08-06"}, **long_chat}
    del nested["model"]
    embeddings = {"object": "list", "data": [{"embedding": [0.01] * 384}] * 600,
                  "model": "text-embedding-3-small",
                  "usage": {"prompt_tokens": 77, "total_tokens": 77}}
    app = FastAPI()
    for path, answer in (("/chat", long_chat), ("/nested", nested), ("/embed", embeddings)):
        app.add_api_route(path, json_route(answer), methods=["POST"])
    install(app, StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger)))
    rows: dict[str, Any] = {}
    async with client(app) as c:
        for path in ("/chat", "/nested", "/embed"):
            r = await c.post(path, json={"messages": [{"role": "user", "content": "hi"}]},
                             headers={"authorization": "Bearer k"})  # (no model asked for)
            assert r.status_code == 200 and len(r.content) > 1 << 20
            assert "x-usage-finish-reason" not in r.headers
            found = await ledger.get_request(principal_of("k"), r.headers["x-request-id"])
            assert found is not None
            rows[path] = found.record
    chat = rows["/chat"]
    assert (chat.model_version, chat.usage.input_tokens) == ("gpt-4o-2024-08-06", 1117)
    assert chat.estimated_cost is not None  # (priced by the served model)
    assert (chat.finish_reason, chat.raw_finish_reason) == (None, None)
    assert rows["/nested"].model_version is None  # (a model nested deeper is not the answer's)
    assert (rows["/embed"].model_version, rows["/embed"].usage.input_tokens) == (
        "text-embedding-3-small", 77)
    [aggregate] = [a for a in await ledger.query(principal_of("k"))
                   if a.model == "unknown"]  # (filed as the request named it: none)
    assert aggregate.finish_reasons == {"unknown": 3}


@pytest.mark.parametrize("declared", [True, False], ids=["length-declared", "no-length"])
async def test_a_large_answer_sent_in_small_pieces_names_its_served_model(
    declared: bool,
) -> None:
    # The served model of a large answer was read from its first non-empty body message
    # alone: an app (or an upstream passed on) whose first message is "{" and the rest in
    # pieces had none read (from_head saw a member cut short). Its first 4 KiB are now
    # gathered across messages. (Without a length the body is held in pieces, then read
    # from their join: that held before too.)
    ledger = MemoryLedger()
    long_chat = copy.deepcopy(OPENAI_CHAT)
    long_chat["choices"][0]["message"]["content"] = "x" * (1 << 20)
    raw = json.dumps(long_chat).encode()
    assert raw.startswith(b'{"id"') and raw.index(b'"model"') < 200

    async def pieces() -> AsyncIterator[bytes]:
        yield raw[:1]
        for i in range(1, 8191, 5):  # the first 8 KiB five bytes at a time
            yield raw[i:i + 5]
        yield raw[8191:]

    async def chat(request: Request) -> Response:
        headers = {"content-length": str(len(raw))} if declared else {}
        return StreamingResponse(pieces(), media_type="application/json", headers=headers)

    app = Starlette(routes=[Route("/chat", chat, methods=["POST"])])
    install(app, StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger)))
    async with client(app) as c:
        r = await c.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]},
                         headers={"authorization": "Bearer k"})  # (no model asked for)
    assert r.status_code == 200 and r.content == raw
    found = await ledger.get_request(principal_of("k"), r.headers["x-request-id"])
    assert found is not None and found.record.usage.input_tokens == 1117
    assert found.record.model_version == "gpt-4o-2024-08-06"
    assert found.record.estimated_cost is not None  # (priced by the served model)


async def test_an_absurd_reported_usage_is_junk_on_every_store(storage: Any) -> None:
    # An upstream's bug: 10**30 prompt tokens. Read as junk (0, past MAX_TOKENS), every
    # store agrees: the caller is charged its 5 output tokens, its next call admitted, and
    # the ledger keeps the row. Before, memory spent the caller's limits for the window and
    # the day, while on Redis and Cluster the limiter's Lua wrote the count back with %d
    # (-2**63: the window read as empty) and the ledger dropped the row.
    from aimiddleware import Policy, UsageRoutes

    absurd = {**OPENAI_CHAT, "model": "gpt-4o", "usage": {
        "prompt_tokens": 10**30, "completion_tokens": 5, "total_tokens": 10**30 + 5}}
    app = Starlette(routes=[Route("/v1/chat/completions", json_route(absurd), methods=["POST"]),
                            *UsageRoutes().routes])
    limits = Policy(requests="100/minute", tokens="100000/minute", cost="1000/day")
    install(app, StackConfig(storage=storage, ratelimit=limits, ratelimit_exempt=["/usage"],
                             usage=UsageConfig(prices=PRICES)))
    auth = {"authorization": "Bearer k-absurd"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as c:
        first = await c.post("/v1/chat/completions", json=body, headers=auth)
        second = await c.post("/v1/chat/completions", json=body, headers=auth)
        history = await c.get("/usage", headers=auth)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-usage-input-tokens"] == "0"
    assert int(second.headers["x-ratelimit-remaining-tokens"]) > 90_000
    [row] = history.json()["data"]
    assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (2, 0, 10)


async def test_an_apps_own_absurd_usage_is_junk_on_every_store(storage: Any) -> None:
    # An app's own figures past MAX_TOKENS (10**19 input tokens: its upstream's figures
    # copied, or its bug) were taken as given: memory spent the caller's limits (its next
    # call a 429) and kept a row of 10**19 tokens, Redis and Cluster refused it too but
    # dropped the row ('value is not an integer or out of range', cost_nanos past 2**63).
    # Now junk on every store, as a provider's: read as 0, each of the five ways an app
    # reports usage charges its 5 output tokens, the next call is admitted, rows are kept.
    from aimiddleware import EventStreamResponse, Policy, StreamResult, UsageRoutes

    absurd = Usage(input_tokens=10**19, output_tokens=5)

    async def reported(request: Request) -> Response:
        report_usage(absurd)
        return PlainTextResponse("ok")

    async def mapping(request: Request) -> Response:
        report_usage({"input_tokens": 10**19, "output_tokens": 5, "total_tokens": 10**19 + 5})
        return PlainTextResponse("ok")

    @envelope(response=True)
    async def enveloped(request: Request) -> Completion:
        return Completion(output="hi", usage=absurd, finish_reason="stop")

    async def body(request: Request) -> Response:  # an envelope passed on as JSON
        return JSONResponse({"object": "envelope", "id": "env_1", "output": "hi",
                             "usage": {"input_tokens": 10**19, "output_tokens": 5}})

    async def streamed(request: Request) -> Response:
        async def events() -> AsyncIterator[Any]:
            yield {"data": "hi"}
            yield StreamResult(usage=absurd, finish_reason="stop")

        return EventStreamResponse(events())

    paths = {"/reported": reported, "/mapping": mapping, "/envelope": enveloped,
             "/body": body, "/stream": streamed}
    app = Starlette(routes=[*(Route(p, e, methods=["POST"]) for p, e in paths.items()),
                            *UsageRoutes().routes])
    limits = Policy(requests="100/minute", tokens="100000/minute", cost="1000/day")
    install(app, StackConfig(storage=storage, ratelimit=limits, ratelimit_exempt=["/usage"],
                             usage=UsageConfig(prices=PRICES)))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with client(app) as c:
        for path in paths:
            auth = {"authorization": f"Bearer k-absurd{path.replace('/', '-')}"}
            first = await c.post(path, json=body, headers=auth)
            second = await c.post(path, json=body, headers=auth)
            assert (first.status_code, second.status_code) == (200, 200), path
            if path != "/stream":  # (a stream's head goes out before its usage)
                assert first.headers["x-usage-input-tokens"] == "0", path
                assert first.headers["x-usage-total-tokens"] == "5", path
            assert int(second.headers["x-ratelimit-remaining-tokens"]) > 90_000, path
            history = await c.get("/usage", headers=auth)
            [row] = history.json()["data"]
            assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (2, 0, 10), (
                path)
        sent = await c.post("/envelope", json=body, headers={"authorization": "Bearer k-env"})
    assert sent.json()["usage"]["input_tokens"] == 0


async def test_a_held_json_head_is_released_if_the_app_sends_no_final_body() -> None:
    rec = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": True})

    scope, receive = scope_for("/x")
    await RequestContextMiddleware(UsageMiddleware(app, record=False))(scope, receive, rec)
    assert [m["type"] for m in rec.messages] == ["http.response.start", "http.response.body"]
    assert rec.messages[1]["body"] == b"{}"


async def test_a_held_json_head_without_any_body_is_released_with_an_empty_one() -> None:
    rec = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"content-type", b"application/json")]})

    scope, receive = scope_for("/x")
    await RequestContextMiddleware(UsageMiddleware(app, record=False))(scope, receive, rec)
    assert [m["type"] for m in rec.messages] == ["http.response.start", "http.response.body"]
    assert rec.messages[1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert (b"x-usage-input-tokens", b"0") not in rec.messages[0]["headers"]


async def test_a_json_body_as_a_bytearray_is_read_and_sent_as_bytes() -> None:
    rec = Recorder()
    ledger = MemoryLedger()
    raw = json.dumps(OPENAI_CHAT).encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"Content-Type", b"application/json; charset=utf-8")]})
        await send({"type": "http.response.body", "body": bytearray(raw)})

    scope, receive = scope_for("/x")
    await RequestContextMiddleware(UsageMiddleware(app, ledger=ledger, prices=PRICES))(
        scope, receive, rec)
    head = dict(rec.messages[0]["headers"])
    assert head[b"x-usage-total-tokens"] == b"1163" and b"x-usage-estimated-cost" in head
    assert rec.messages[1] == {"type": "http.response.body", "body": raw, "more_body": False}
    assert type(rec.messages[1]["body"]) is bytes
    [row] = await ledger.query("ip_127.0.0.1")
    assert row.requests == 1 and row.total_tokens == 1163


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw = UsageMiddleware(app, record=False)
    await mw({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await mw({"type": "websocket"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


async def test_accounting_errors_never_fail_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(MemoryLedger):
        async def record(self, rec: Any) -> None:
            raise RuntimeError("boom")

    async with client(make_app(Broken())) as c:
        r = await c.post("/openai", json={"model": "gpt-4o"})
    assert r.status_code == 200 and r.headers["x-usage-total-tokens"] == "1163"
    assert any("usage accounting failed" in rec.message for rec in caplog.records)


@pytest.mark.parametrize("body", [
    b'{"id": "a", "usage": {"reasoning_tokens": 1, "input_tokens": [1]}}',
    b'{"id": "a", "usage": {"cached_input_tokens": 1, "output_tokens": 1e400}}',
    b'{"object": "envelope", "usage": {"input_tokens": {"n": 1}}}',
], ids=["list", "inf", "envelope"])
async def test_a_json_answer_with_a_non_number_count_passes_unread(body: bytes) -> None:
    """The usage layer's read of such a body raised out of its send: a 500 instead of the
    app's 200."""

    async def endpoint(request: Request) -> Response:
        return Response(body, media_type="application/json")

    ledger = MemoryLedger()
    app = install(Starlette(routes=[Route("/a", endpoint, methods=["POST"])]),
                  StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger)))
    async with client(app) as c:
        r = await c.post("/a", json={"model": "gpt-4o"})
    assert r.status_code == 200 and r.content == body
    assert "x-usage-input-tokens" not in r.headers


async def test_unknown_messages_while_holding_release_the_head_first() -> None:
    rec = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"a":', "more_body": True})
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

    scope, receive = scope_for("/x")
    await RequestContextMiddleware(UsageMiddleware(app, record=False))(scope, receive, rec)
    assert [m["type"] for m in rec.messages] == [
        "http.response.start", "http.response.body", "http.response.trailers"]
    assert rec.messages[1] == {"type": "http.response.body", "body": b'{"a":', "more_body": True}


class GenericMemoryLedger(MemoryLedger):
    """A subclass: the accounting writes it through record(), the way of every other ledger."""


@pytest.mark.parametrize("path", ["/openai", "/anthropic", "/gemini", "/reported", "/stream"])
async def test_in_process_write_reads_back_as_the_generic_write(path: str) -> None:
    """The accounting writes a MemoryLedger without building a record (record_values);
    readers see what the generic record() write gives them."""
    fast, generic = MemoryLedger(), GenericMemoryLedger()
    headers = []
    for led in (fast, generic):
        async with client(make_app(led)) as c:
            r = await c.post(path, json={"model": "gpt-4o"},
                             headers={"authorization": "Bearer k1", "x-request-id": "req-1"})
        assert r.status_code == 200
        headers.append({k: v for k, v in r.headers.items() if k != "x-usage-duration-ms"})
    assert headers[0] == headers[1]
    principal = ledger_principal(fast)
    assert principal == ledger_principal(generic)
    assert await fast.query(principal) == await generic.query(principal)
    got = await fast.get_request(principal, "req-1")
    want = await generic.get_request(principal, "req-1")
    assert got is not None and want is not None
    skip = {"record_id", "duration_ms", "timestamp"}
    assert got.record.model_dump(exclude=skip) == want.record.model_dump(exclude=skip)
    assert got.record.estimated_cost == want.record.estimated_cost
    assert str(got.record.estimated_cost) == str(want.record.estimated_cost)


async def test_finish_nowait_records_memory_at_once_and_hands_back_other_writes() -> None:
    from aimiddleware.context import RequestContext
    from aimiddleware.usage.accounting import UsageAccounting
    from aimiddleware.usage.extract import from_response, parse_json

    def ctx() -> RequestContext:
        c = RequestContext(request_id="r1", principal="p", method="POST", path="/v1")
        c.response_status = 200
        return c

    body = json.dumps(OPENAI_CHAT).encode()
    fast = UsageAccounting(prices=PRICES, ledger=MemoryLedger())
    c1 = ctx()
    fast.absorb(c1, from_response(parse_json(body)))
    assert fast.finish_nowait(c1) is None  # recorded, nothing to await
    assert fast.settings.ledger is not None
    [row] = await fast.settings.ledger.query("p")
    assert row.requests == 1 and row.estimated_cost == c1.estimated_cost
    generic = UsageAccounting(prices=PRICES, ledger=GenericMemoryLedger())
    c2 = ctx()
    generic.absorb(c2, from_response(parse_json(body)))
    pending = generic.finish_nowait(c2)
    assert pending is not None
    await pending
    assert generic.settings.ledger is not None
    assert await generic.settings.ledger.query("p") == [row]


async def test_a_usage_that_is_no_usage_is_logged_and_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aimiddleware.context import RequestContext
    from aimiddleware.usage.accounting import UsageAccounting

    ledger = MemoryLedger()
    acc = UsageAccounting(prices=PRICES, ledger=ledger)
    ctx = RequestContext(request_id="r1", principal="p", method="POST", path="/v1")
    ctx.usage = (12, 1, 13, 0, 0, 0, 1)  # type: ignore[assignment]  # (an endpoint's mistake)
    ctx.raw_finish_reason, ctx.response_status = "stop", 200
    with caplog.at_level(logging.ERROR, logger="aimiddleware.usage"):
        assert acc.finish_nowait(ctx) is None
    assert any("usage accounting failed" in rec.message for rec in caplog.records)
    assert await ledger.query("p") == [] and ledger.pending == 0


async def test_a_stream_event_nested_too_deep_is_skipped_not_a_failure() -> None:
    ledger = MemoryLedger()
    rec = Recorder()
    deep = b"data: " + b'{"usage":' * 50_000 + b"1" + b"}" * 50_000 + b"\n\n"
    lines = [deep, *sse_lines(STREAM_EVENTS)]
    app = event_stream_app(lines)
    mw = RequestContextMiddleware(UsageMiddleware(app, ledger=ledger))
    scope, receive = scope_for("/stream", b'{"model": "gpt-4o"}')
    await mw(scope, receive, rec)
    assert b"".join(m.get("body", b"") for m in rec.messages) == b"".join(lines)
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert (row.input_tokens, row.output_tokens, row.finish_reasons) == (12, 3, {"stop": 1})


def test_usage_headers_reuse_built_pairs_and_stay_bounded() -> None:
    """The cost and finish-reason headers come from pairs built once: the same bytes as
    built fresh, and at most 1024 cost texts kept."""
    from aimiddleware.context import RequestContext
    from aimiddleware.usage.accounting import _PAIRS_MAX, UsageAccounting

    acc = UsageAccounting(record=False, header_prefix="x-u-")
    for i in range(_PAIRS_MAX + 50):
        ctx = RequestContext(request_id="r", principal="p", method="POST", path="/")
        ctx.usage = Usage(input_tokens=i, output_tokens=1)
        ctx.estimated_cost = Decimal(i) / 1000
        ctx.finish_reason = "stop" if i % 2 else "something-else"
        got = dict(acc.headers(ctx))
        assert got[b"x-u-estimated-cost"] == format(ctx.estimated_cost, "f").encode()
        assert got[b"x-u-finish-reason"] == ctx.finish_reason.encode()
        assert got[b"x-u-input-tokens"] == b"%d" % i
        assert len(acc._cost_pairs) <= _PAIRS_MAX
