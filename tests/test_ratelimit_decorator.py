"""``@rate_limit`` on single endpoints: FastAPI of any signature, Starlette, same policies."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import aimiddleware
from aimiddleware import (
    EventStreamResponse,
    OpenAIChatDialect,
    Policy,
    StreamResult,
    Usage,
    rate_limit,
)
from aimiddleware.ratelimit.backend import Hit
from aimiddleware.storage import Storage
from tests.live_server import serve
from tests.ratelimit_helpers import principal_of
from tests.test_ratelimit_middleware import check_headers, parse_list


class Item(BaseModel):
    name: str


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")  # type: ignore[arg-type]


async def test_fastapi_endpoints_of_any_signature() -> None:
    app = FastAPI()

    @app.post("/items/{item_id}")
    @rate_limit(Policy(requests="2/minute"))
    async def create(item_id: int, item: Item, q: str | None = None) -> dict[str, object]:
        return {"id": item_id, "name": item.name, "q": q}

    @app.get("/sync")
    @rate_limit("1/minute")
    def sync_endpoint() -> dict[str, str]:
        return {"ok": "yes"}

    aimiddleware.install(app)
    async with _client(app) as c:
        r1 = await c.post("/items/7?q=z", json={"name": "a"})
        r2 = await c.post("/items/8", json={"name": "b"})
        r3 = await c.post("/items/9", json={"name": "c"})
        bad = await c.post("/items/x", json={"name": "c"})
        s1 = await c.get("/sync")
        s2 = await c.get("/sync")
    assert r1.json() == {"id": 7, "name": "a", "q": "z"}
    assert r1.headers["x-ratelimit-remaining-requests"] == "1"
    assert r2.headers["x-ratelimit-remaining-requests"] == "0"
    assert r3.status_code == 429 and r3.json()["dimension"] == "requests"
    assert "x-ratelimit-limit-requests" in r3.headers and "ratelimit" in r3.headers
    assert bad.status_code == 422  # FastAPI validation still runs; no hidden parameter leaks
    assert s1.status_code == 200 and s1.headers["x-ratelimit-limit-requests"] == "1"
    assert s2.status_code == 429
    schema = app.openapi()
    params = [p["name"] for p in schema["paths"]["/items/{item_id}"]["post"]["parameters"]]
    assert params == ["item_id", "q"]


async def test_starlette_endpoint_and_tiers() -> None:
    @rate_limit(
        {"free": Policy(requests="1/minute"), "pro": Policy(requests="3/minute")},
        default_tier="free",
        tier=lambda principal: "pro" if principal == "ip_pro" else None,
    )
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": request.url.path})

    app = Starlette(routes=[Route("/hello", hello)])
    wrapped = aimiddleware.install(
        app, principal=lambda scope: "ip_pro" if (b"x-tier", b"pro") in scope["headers"] else None
    )
    async with _client(wrapped) as c:
        free = [(await c.get("/hello")).status_code for _ in range(2)]
        ok = await c.get("/hello", headers={"x-tier": "pro"})
    assert free == [200, 429]
    assert ok.json() == {"hello": "/hello"} and ok.headers["x-ratelimit-limit-requests"] == "3"
    async with _client(wrapped) as c:
        pro = [(await c.get("/hello", headers={"x-tier": "pro"})).status_code for _ in range(4)]
    assert pro == [200, 200, 429, 429]


async def test_a_body_that_is_not_json_is_estimated_not_refused() -> None:
    """As in the middleware: a form or upload on a token-limited endpoint is admitted (its
    size estimates its tokens); a malformed JSON body is still a typed 400."""
    app = FastAPI()

    @app.post("/upload")
    @rate_limit(Policy(tokens="100000/minute"))
    async def upload() -> dict[str, bool]:
        return {"ok": True}

    @rate_limit(Policy(tokens="100000/minute"))
    async def form(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app.router.routes.append(Route("/form", form, methods=["POST"]))
    aimiddleware.install(app)
    async with _client(app) as c:
        up = await c.post("/upload", content=b"x" * 400, headers={"content-type": "text/plain"})
        fm = await c.post("/form", data={"a": "b"})
        bad = await c.post(
            "/upload", content=b'{"model": ', headers={"content-type": "application/json"}
        )
    assert up.status_code == 200 and up.headers["x-ratelimit-remaining-tokens"] != "100000"
    assert fm.status_code == 200 and "x-ratelimit-limit-tokens" in fm.headers
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


async def test_a_streaming_endpoint_is_settled_when_its_stream_ends(storage: Storage) -> None:
    # The decorator settled when the endpoint returned its response object, before the
    # stream was sent: the concurrency slot was free while the stream ran, and the stream's
    # usage never replaced the reservation (the whole output estimate stayed charged).
    gate = anyio.Event()

    async def tokens() -> AsyncIterator[Any]:
        yield "Hello"
        await gate.wait()
        yield StreamResult(usage=Usage(input_tokens=9, output_tokens=3), finish_reason="stop")

    @rate_limit(Policy(tokens="10000/minute", concurrency=1), storage=storage)
    async def chat(request: Request) -> EventStreamResponse:
        return EventStreamResponse(tokens(), dialect=OpenAIChatDialect("m"))

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    aimiddleware.install(app)
    limiter = chat.rate_limiter  # type: ignore[attr-defined]
    body = {"model": "m", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": "Bearer k1"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=auth) as first:
            assert first.status_code == 200
            async with c.stream("POST", "/v1/chat/completions", json=body,
                                headers=auth) as busy:  # (the head is enough)
                assert busy.status_code == 429
                assert json.loads(await busy.aread())["dimension"] == "concurrency"
            gate.set()
            await first.aread()
        with anyio.fail_after(10):  # (settled just after the last byte)
            while await limiter.backend.in_flight(principal_of("k1")):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        hits = [Hit(lim.field, lim.window * 1000, lim.amount, 0)
                for lim in limiter.policies["default"].limits]
        state = (await limiter.backend.peek(principal_of("k1"), hits))[0]
        assert state.prev + state.curr == 12  # the stream's usage, not 500 + the prompt
        again = await c.post("/v1/chat/completions", json=body, headers=auth)
        assert again.status_code == 200
        gate.set()


class Completion(BaseModel):
    usage: dict[str, int]


async def test_a_json_endpoint_is_charged_the_usage_it_reports(storage: Storage) -> None:
    # The decorator settled before the result was serialized, so the usage the JSON body
    # reports never replaced the reservation: 6 tokens used, 1,005 charged.
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    policy = Policy(tokens="100000/minute", output_estimate=1000)
    app = FastAPI()

    @app.post("/dict")
    @rate_limit(policy, storage=storage)
    async def as_dict(body: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [{"index": 0, "finish_reason": "stop"}], "usage": usage}

    @app.post("/model")
    @rate_limit(policy, storage=storage)
    def as_model(body: dict[str, Any]) -> Completion:  # (sync: run in the threadpool)
        return Completion(usage=usage)

    @app.post("/response")
    @rate_limit(policy, storage=storage)
    async def as_response(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 1}})

    aimiddleware.install(app)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with _client(app) as c:
        for path in ("/dict", "/model", "/response"):
            remaining = []
            for _ in range(3):
                r = await c.post(path, json=body, headers={"authorization": "Bearer k1"})
                assert r.status_code == 200, r.text
                remaining.append(int(r.headers["x-ratelimit-remaining-tokens"]))
            # (each head shows what the request before it was charged)
            assert [a - b for a, b in itertools.pairwise(remaining)] == [6, 6], path


class Answer(BaseModel):
    text: str


@pytest.mark.parametrize("arrangement", ["stack", "layers"])
async def test_a_value_that_fails_response_validation_is_refunded(
    storage: Storage, arrangement: str
) -> None:
    # The decorator settled when the endpoint returned, before FastAPI validated the value
    # against response_model: a ResponseValidationError (a 500) was charged as a success, so
    # two broken answers spent the caller's two requests and the good one was refused.
    app = FastAPI()

    @app.post("/answer", response_model=Answer)
    @rate_limit(Policy(requests="2/minute", concurrency=1), storage=storage)
    async def answer(body: dict[str, Any]) -> Any:
        return {"text": body["text"]} if body.get("ok") else {"wrong": "shape"}

    aimiddleware.install(app)
    if arrangement == "layers":  # install()'s layers as one middleware each
        (stack,) = app.user_middleware
        app.user_middleware.clear()
        for cls, options in reversed(stack.kwargs["layers"]):
            app.add_middleware(cls, **options)
    limiter = answer.rate_limiter  # type: ignore[attr-defined]
    auth = {"authorization": "Bearer k1"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        broken = [await c.post("/answer", json={"ok": False}, headers=auth) for _ in range(3)]
        good = [await c.post("/answer", json={"ok": True, "text": t}, headers=auth)
                for t in ("a", "b")]
        refused = await c.post("/answer", json={"ok": True, "text": "c"}, headers=auth)
    assert [r.status_code for r in broken] == [500, 500, 500]
    assert all(r.json()["error"]["type"] == "server_error" for r in broken)
    assert [r.status_code for r in good] == [200, 200], [r.text for r in good]
    assert good[0].json() == {"text": "a"}
    assert refused.status_code == 429 and refused.json()["dimension"] == "requests"
    assert await limiter.backend.in_flight(principal_of("k1")) == 0  # every lease released


async def test_a_stream_the_request_never_sends_gives_back_its_slot(storage: Storage) -> None:
    # An endpoint that calls a decorated streaming one and answers with something else never
    # sends the held stream: its admission was settled only when sent, so the concurrency
    # slot stayed taken (on the in-process store for the life of the process).
    async def tokens() -> AsyncIterator[str]:
        yield "never produced"

    @rate_limit(Policy(requests="100/minute", concurrency=1), storage=storage)
    async def chat(request: Request) -> StreamingResponse:
        return StreamingResponse(tokens(), media_type="text/plain")

    async def preview(request: Request) -> JSONResponse:
        await chat(request)  # (its stream is dropped: only a preview is answered)
        return JSONResponse({"preview": True})

    app = Starlette(routes=[Route("/preview", preview), Route("/chat", chat)])
    aimiddleware.install(app)
    limiter = chat.rate_limiter  # type: ignore[attr-defined]
    auth = {"authorization": "Bearer k1"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        first = await c.get("/preview", headers=auth)
        second = await c.get("/preview", headers=auth)
        streamed = await c.get("/chat", headers=auth)
    assert first.status_code == 200 and second.status_code == 200, second.text
    assert streamed.status_code == 200 and streamed.text == "never produced"
    assert await limiter.backend.in_flight(principal_of("k1")) == 0
    hits = [Hit(lim.field, lim.window * 1000, lim.amount, 0)
            for lim in limiter.policies["default"].limits]
    state = (await limiter.backend.peek(principal_of("k1"), hits))[0]
    assert state.prev + state.curr == 1  # the two never sent were refunded; the stream counts


def _completion() -> dict[str, Any]:
    return {
        "id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }


@pytest.mark.parametrize("chain", ["install", "hand-built"])
async def test_under_the_middleware_the_headers_tell_the_limit_that_binds_first(
    chain: str,
) -> None:
    """``@rate_limit`` on an endpoint (3 requests a minute, 2 at once) under whole-app limits
    (100 requests, 10,000 tokens a minute): each response tells the limit that binds first.
    The middleware's headers replaced the decorator's, so a client was told 99 requests
    remained until the 429 came after 3; the 429 mixed the two sides' lists."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @rate_limit(Policy(requests="3/minute", concurrency=2))
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        return _completion()

    whole = Policy(requests="100/minute", tokens="10000/minute")
    if chain == "install":
        aimiddleware.install(app, ratelimit=whole)
    else:  # the layers added one by one (the last added is the outermost)
        from aimiddleware import ErrorMiddleware, RateLimitMiddleware, RequestContextMiddleware

        app.add_middleware(RateLimitMiddleware, policies=whole)
        app.add_middleware(ErrorMiddleware)
        app.add_middleware(RequestContextMiddleware)
    auth = {"authorization": "Bearer k1"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        rs = [await c.post("/v1/chat/completions", json=body, headers=auth) for _ in range(4)]
    assert [r.status_code for r in rs] == [200, 200, 200, 429], rs[-1].text
    for r in rs:
        check_headers(r)  # each once; the IETF fields parse (http-sfv)
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-limit-tokens"] == "10000"  # (the middleware's alone)
        policy = dict(parse_list(r.headers["ratelimit-policy"]))
        assert policy == {
            "requests-1m": {"q": 3, "qu": "requests", "w": 60},
            "tokens-1m": {"q": 10000, "w": 60},
            "concurrency": {"q": 2, "qu": "concurrent-requests"},
        }, r.headers["ratelimit-policy"]
    left = [r.headers["x-ratelimit-remaining-requests"] for r in rs]
    assert left == ["2", "1", "0", "0"]
    state = [dict(parse_list(r.headers["ratelimit"])) for r in rs]
    assert [s["requests-1m"]["r"] for s in state] == [2, 1, 0, 0]
    assert all(s["tokens-1m"]["r"] < 10000 and "concurrency" in s for s in state)
    refused = rs[-1]
    assert refused.json()["dimension"] == "requests"
    assert state[-1]["requests-1m"]["t"] == int(refused.headers["retry-after"])


@pytest.mark.parametrize(
    "theirs",
    [
        # the app set one header of a dimension: not a limiter's; ours stand
        [(b"x-ratelimit-limit-requests", b"999")],
        # a triple with more remaining than ours, or an equal count: ours
        [(b"x-ratelimit-limit-requests", b"500"), (b"x-ratelimit-remaining-requests", b"400"),
         (b"x-ratelimit-reset-requests", b"1s")],
        [(b"X-RateLimit-Limit-Requests", b"9"), (b"x-ratelimit-remaining-requests", b"7"),
         (b"x-ratelimit-reset-requests", b"1s")],
        # unreadable values (a remaining that is not a count, a list that is not one): ours
        [(b"x-ratelimit-limit-requests", b"9"), (b"x-ratelimit-remaining-requests", b"-1"),
         (b"x-ratelimit-reset-requests", b"1s"), (b"ratelimit", b"requests;r=0"),
         (b"ratelimit-policy", b"\"a\";q=1, ")],
    ],
)
def test_merged_headers_keep_ours_unless_theirs_bind_first(
    theirs: list[tuple[bytes, bytes]],
) -> None:
    from aimiddleware.ratelimit.headers import merge_rate_headers

    ours = [
        (b"x-ratelimit-limit-requests", b"10"), (b"x-ratelimit-remaining-requests", b"7"),
        (b"x-ratelimit-reset-requests", b"6s"),
        (b"ratelimit-policy", b'"requests-1m";q=10;qu="requests";w=60'),
        (b"ratelimit", b'"requests-1m";r=7;t=6'),
    ]
    app = [(b"content-type", b"application/json")]
    assert merge_rate_headers([*app, *theirs], ours) == [*app, *ours]


def test_merged_headers_take_each_dimension_and_member_from_the_tighter_side() -> None:
    from aimiddleware.ratelimit.headers import merge_rate_headers

    ours = [
        (b"x-ratelimit-limit-requests", b"100"), (b"x-ratelimit-remaining-requests", b"90"),
        (b"x-ratelimit-reset-requests", b"6s"),
        (b"x-ratelimit-limit-tokens", b"1000"), (b"x-ratelimit-remaining-tokens", b"10"),
        (b"x-ratelimit-reset-tokens", b"50s"),
        (b"ratelimit-policy", b'"requests-1m";q=100;qu="requests";w=60, "tokens-1m";q=1000;w=60'),
        (b"ratelimit", b'"requests-1m";r=90;t=6, "tokens-1m";r=10;t=50'),
    ]
    theirs = [
        (b"x-ratelimit-limit-requests", b"5"), (b"x-ratelimit-remaining-requests", b"4"),
        (b"x-ratelimit-reset-requests", b"12s"),
        (b"x-ratelimit-limit-tokens", b"9000"), (b"x-ratelimit-remaining-tokens", b"8000"),
        (b"x-ratelimit-reset-tokens", b"1s"),
        (b"ratelimit-policy",
         b'"requests-1m";q=5;qu="requests";w=60, "tokens-1m";q=9000;w=60, '
         b'"requests-1d";q=50;w=86400'),
        (b"ratelimit", b'"requests-1m";r=4;t=12, "tokens-1m";r=8000;t=1, "requests-1d";r=40;t=9'),
        (b"retry-after", b"3"),
    ]
    out = merge_rate_headers(theirs, ours)
    assert out == [
        (b"retry-after", b"3"),  # (not a rate-limit header: kept as it was)
        (b"x-ratelimit-limit-requests", b"5"), (b"x-ratelimit-remaining-requests", b"4"),
        (b"x-ratelimit-reset-requests", b"12s"),
        (b"x-ratelimit-limit-tokens", b"1000"), (b"x-ratelimit-remaining-tokens", b"10"),
        (b"x-ratelimit-reset-tokens", b"50s"),
        (b"ratelimit-policy",
         b'"requests-1m";q=5;qu="requests";w=60, "tokens-1m";q=1000;w=60, '
         b'"requests-1d";q=50;w=86400'),
        (b"ratelimit", b'"requests-1m";r=4;t=12, "tokens-1m";r=10;t=50, "requests-1d";r=40;t=9'),
    ]
    # with nothing of theirs, ours are appended as they are
    assert merge_rate_headers([(b"a", b"1")], ours) == [(b"a", b"1"), *ours]
