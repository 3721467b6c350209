"""Request context: ids, trace context, principal, the bounded body, the ContextVar."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import (
    AuthenticationFailed,
    RequestContextMiddleware,
    RequestIdFilter,
    current,
    report_usage,
)
from aimiddleware.context import (
    SCOPE_KEY,
    current_or_none,
    default_principal,
    parse_traceparent,
    valid_request_id,
)
from aimiddleware.usage.models import Usage

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def echo(request: Request) -> JSONResponse:
    ctx = current()
    assert request.scope["state"][SCOPE_KEY] is ctx
    body = await request.body()
    return JSONResponse(
        {
            "request_id": ctx.request_id,
            "principal": ctx.principal,
            "trace_id": ctx.trace.trace_id,
            "parent_id": ctx.trace.parent_id,
            "traceparent": ctx.trace.traceparent,
            "tracestate": ctx.trace.tracestate,
            "body_len": len(body),
            "same_body": body == ctx.body,
        }
    )


def make_app(**options: Any) -> Starlette:
    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])
    app.add_middleware(RequestContextMiddleware, **options)
    return app


def client(app: Any, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", **kw)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("abc-123", True),
        ("req_0123456789abcdef", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("new\nline", False),
        ("trailing-newline\n", False),  # echoed, it would break the response head
        ("a" * 128 + "\n", False),
        ("-leading-dash", False),
        ("ünïcode", False),
    ],
)
def test_request_id_rules(value: str, ok: bool) -> None:
    assert valid_request_id(value) is ok


async def test_valid_request_id_is_kept_and_echoed() -> None:
    async with client(make_app()) as c:
        r = await c.get("/", headers={"x-request-id": "client-42"})
    assert r.headers["x-request-id"] == "client-42"
    assert r.json()["request_id"] == "client-42"


@pytest.mark.parametrize("bad", ["x" * 300, "bad id", "a\tb"])
async def test_invalid_request_id_is_replaced(bad: str) -> None:
    async with client(make_app()) as c:
        r = await c.get("/", headers={"x-request-id": bad})
    rid = r.headers["x-request-id"]
    assert rid != bad and rid.startswith("req_") and r.json()["request_id"] == rid


async def test_request_id_generated_and_unique() -> None:
    async with client(make_app()) as c:
        ids = {(await c.get("/")).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


async def test_untrusted_request_id_is_ignored() -> None:
    async with client(make_app(trust_request_id=False)) as c:
        r = await c.get("/", headers={"x-request-id": "client-42"})
    assert r.headers["x-request-id"] != "client-42"


async def test_custom_request_id_header() -> None:
    async with client(make_app(request_id_header="X-Correlation-ID")) as c:
        r = await c.get("/", headers={"x-correlation-id": "corr-1"})
    assert r.headers["x-correlation-id"] == "corr-1"
    assert "x-request-id" not in r.headers


def test_traceparent_valid_is_continued_with_a_new_span() -> None:
    t = parse_traceparent(TRACE)
    assert t.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert t.parent_id == "00f067aa0ba902b7"
    assert t.span_id != t.parent_id and len(t.span_id) == 16
    assert t.traceparent == f"00-{t.trace_id}-{t.span_id}-01"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        "garbage",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has 4 fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    ],
)
def test_traceparent_invalid_or_missing_is_replaced(bad: str | None) -> None:
    t = parse_traceparent(bad)
    assert t.parent_id is None
    assert len(t.trace_id) == 32 and t.trace_id != "0" * 32
    assert t.traceparent.startswith("00-")


def test_traceparent_future_version_may_carry_more_fields() -> None:
    t = parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
    assert t.parent_id == "00f067aa0ba902b7"


async def test_traceparent_through_the_middleware() -> None:
    async with client(make_app()) as c:
        r = await c.get("/", headers={"traceparent": TRACE})
    assert r.json()["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert r.json()["parent_id"] == "00f067aa0ba902b7"


async def test_tracestate_fields_are_joined_as_one_list() -> None:
    # RFC 9110 5.3 list rule, as W3C Trace Context asks: several fields, one list in order
    headers = [("traceparent", TRACE), ("tracestate", "a=1,b=2"), ("tracestate", " "),
               ("tracestate", "c=3")]
    async with client(make_app()) as c:
        r = await c.get("/", headers=headers)
    assert r.json()["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert r.json()["tracestate"] == "a=1,b=2,c=3"


OTHER_TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("second", [TRACE, OTHER_TRACE])
async def test_two_traceparent_fields_start_a_new_trace(second: str) -> None:
    # W3C Trace Context: more than one traceparent is an invalid one; neither is trusted,
    # and tracestate goes with it
    headers = [("traceparent", TRACE), ("traceparent", second), ("tracestate", "a=1")]
    async with client(make_app()) as c:
        r = await c.get("/", headers=headers)
    body = r.json()
    assert body["parent_id"] is None and body["tracestate"] is None
    assert body["trace_id"] not in (TRACE.split("-")[1], second.split("-")[1])
    assert len(body["trace_id"]) == 32


def _scope(headers: list[tuple[bytes, bytes]], client: Any = ("10.0.0.1", 1234)) -> dict[str, Any]:
    return {"type": "http", "headers": headers, "client": client}


def test_principal_hashes_bearer_and_never_keeps_the_key() -> None:
    key = b"sk-live-verysecret"
    p = default_principal(_scope([(b"authorization", b"Bearer " + key)]))
    assert p == "key_" + hashlib.sha256(key).hexdigest()[:32]
    assert "verysecret" not in p
    assert default_principal(_scope([(b"x-api-key", key)])) == p


def test_principal_falls_back_to_client_then_anonymous() -> None:
    assert default_principal(_scope([])) == "ip_10.0.0.1"
    assert default_principal(_scope([(b"authorization", b"Basic abc")])) == "ip_10.0.0.1"
    assert default_principal(_scope([], client=None)) == "anonymous"


def test_principal_ignores_forwarded_for() -> None:
    scope = _scope([(b"x-forwarded-for", b"1.2.3.4")])
    assert default_principal(scope) == "ip_10.0.0.1"


async def test_principal_resolvers_sync_and_async() -> None:
    def sync_resolver(scope: Any) -> str | None:
        return "tenant-a"

    async def async_resolver(scope: Any) -> str | None:
        return None  # falls back to the default

    async with client(make_app(principal=sync_resolver)) as c:
        assert (await c.get("/")).json()["principal"] == "tenant-a"
    async with client(make_app(principal=async_resolver)) as c:
        r = await c.get("/", headers={"authorization": "Bearer k"})
    assert r.json()["principal"].startswith("key_")


async def test_principal_resolver_can_reject_with_a_typed_error() -> None:
    async def resolver(scope: Any) -> str:
        raise AuthenticationFailed("Unknown API key.")

    async with client(make_app(principal=resolver)) as c:
        r = await c.get("/")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"]["code"] == "authentication"
    assert r.json()["request_id"] == r.headers["x-request-id"]


async def test_principal_resolver_crash_is_internal_without_detail() -> None:
    def resolver(scope: Any) -> str:
        raise RuntimeError("db password=hunter2")

    async with client(make_app(principal=resolver)) as c:
        r = await c.get("/")
    assert r.status_code == 500 and "hunter2" not in r.text


async def test_body_is_read_once_and_replayed() -> None:
    async with client(make_app()) as c:
        r = await c.post("/", content=b"x" * 5000)
    assert r.json()["body_len"] == 5000 and r.json()["same_body"] is True


class Recorder:
    """Drive the middleware with hand-made ASGI messages and record what comes back."""

    def __init__(self, chunks: list[bytes], content_length: int | None) -> None:
        self.chunks = list(chunks)
        self.received = 0
        self.sent: list[dict[str, Any]] = []
        self.headers = [(b"host", b"t")]
        if content_length is not None:
            self.headers.append((b"content-length", str(content_length).encode()))

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        chunk = self.chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "method": "POST",
            "path": "/",
            "headers": self.headers,
            "client": ("127.0.0.1", 1),
        }


async def _never(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the app must not run for an oversized body")


async def test_413_from_content_length_reads_nothing() -> None:
    rec = Recorder([b"x" * 10] * 100, content_length=1000)
    mw = RequestContextMiddleware(_never, max_body_size=100)
    await mw(rec.scope(), rec.receive, rec.send)
    assert rec.sent[0]["status"] == 413
    assert rec.received == 0


async def test_413_for_chunked_body_stops_reading_at_the_bound() -> None:
    rec = Recorder([b"x" * 10] * 100, content_length=None)
    mw = RequestContextMiddleware(_never, max_body_size=55)
    await mw(rec.scope(), rec.receive, rec.send)
    assert rec.sent[0]["status"] == 413
    assert rec.received == 6  # 60 bytes > 55: stopped there, 94 chunks never read
    headers = dict(rec.sent[0]["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert b"x-request-id" in headers


async def test_body_limit_can_be_disabled() -> None:
    async with client(make_app(max_body_size=None)) as c:
        r = await c.post("/", content=b"x" * 100_000)
    assert r.json()["body_len"] == 100_000


async def test_invalid_content_length_is_400() -> None:
    rec = Recorder([b"abc"], content_length=None)
    rec.headers.append((b"content-length", b"12abc"))
    await RequestContextMiddleware(_never)(rec.scope(), rec.receive, rec.send)
    assert rec.sent[0]["status"] == 400


async def test_huge_content_length_is_413_not_500() -> None:
    # More digits than int() converts (4300): a typed 413, not a ValueError (a 500).
    rec = Recorder([b"abc"], content_length=None)
    rec.headers.append((b"content-length", b"9" * 5000))
    await RequestContextMiddleware(_never, max_body_size=100)(rec.scope(), rec.receive, rec.send)
    assert rec.sent[0]["status"] == 413
    assert rec.received == 0


async def test_zero_padded_content_length_is_its_value() -> None:
    rec = Recorder([b"abc"], content_length=None)
    rec.headers.append((b"content-length", b"0" * 5000 + b"3"))
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current().body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await RequestContextMiddleware(app, max_body_size=100)(rec.scope(), rec.receive, rec.send)
    assert seen == [b"abc"] and rec.sent[0]["status"] == 204


async def test_context_var_is_reset_after_the_request() -> None:
    async with client(make_app()) as c:
        await c.get("/")
    assert current_or_none() is None
    with pytest.raises(RuntimeError, match="RequestContextMiddleware"):
        current()


async def test_report_usage_reaches_the_context() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        report_usage({"input_tokens": 3, "output_tokens": 4}, finish_reason="end_turn", model="m")
        ctx = current()
        seen.update(usage=ctx.usage, raw=ctx.raw_finish_reason, model=ctx.model)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with client(RequestContextMiddleware(app)) as c:
        r = await c.get("/")
    assert r.status_code == 204
    assert seen == {
        "usage": Usage(input_tokens=3, output_tokens=4),
        "raw": "end_turn",
        "model": "m",
    }
    assert seen["usage"].total_tokens == 7


async def test_logging_filter_adds_request_id(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.ctx")
    log.addFilter(RequestIdFilter())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        log.warning("inside")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with caplog.at_level(logging.WARNING, logger="test.ctx"):
        async with client(RequestContextMiddleware(app)) as c:
            r = await c.get("/", headers={"x-request-id": "log-me"})
        log.warning("outside")
    assert r.status_code == 204
    assert [rec.request_id for rec in caplog.records] == ["log-me", "-"]  # type: ignore[attr-defined]


async def test_non_http_scopes_pass_through() -> None:
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await RequestContextMiddleware(app)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_body_size": -1}, {"request_id_header": ""}, {"principal": "not callable"}],
)
def test_configuration_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        RequestContextMiddleware(_never, **kwargs)


def test_begin_context_equals_the_constructor() -> None:
    """The context layer's cheap constructor leaves every field as ``RequestContext(...)``
    would, and a field written later belongs to that context alone."""
    import dataclasses

    from aimiddleware.context import RequestContext, begin_context

    args = ("req_1", "POST", "/v1/chat", "00-tp", "ts", b"application/json")
    fast = begin_context(*args)
    slow = RequestContext(
        request_id="req_1",
        principal="anonymous",
        method="POST",
        path="/v1/chat",
        traceparent_header="00-tp",
        tracestate_header="ts",
        content_type=b"application/json",
    )
    for f in dataclasses.fields(RequestContext):
        if f.name in ("started", "started_at"):
            assert abs(getattr(fast, f.name) - getattr(slow, f.name)) < 5
        elif f.name == "after_response":  # the one difference: a layer's context runs hooks
            assert fast.after_response == () and slow.after_response is None
        else:
            assert getattr(fast, f.name) == getattr(slow, f.name), f.name
    assert fast.json() is None and fast.state == {} and fast.state is not slow.state
    other = begin_context(*args)
    fast.model, fast.usage = "m", None
    fast.state["k"] = 1
    assert other.model is None and other.state == {} and RequestContext.model is None
    assert repr(fast).startswith("RequestContext(request_id='req_1'")
