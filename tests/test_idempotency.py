from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import socket
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import http_sfv
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from httpx_sse import aconnect_sse
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from aimiddleware import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    Policy,
    RequestContextMiddleware,
    Storage,
    idempotent,
    install,
    rate_limit,
)
from aimiddleware.errors import Conflict, InvalidRequest
from aimiddleware.idempotency import (
    Claimed,
    Completed,
    Fingerprinter,
    InFlight,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    parse_key,
)
from tests.gc_counts import tracked_per_entry
from tests.idempotency_app import build
from tests.stalls import in_time, steady

KEY = {"Idempotency-Key": '"8e03978e-40d5-43e8-bc93-6894a57f9324"'}


def client(app: Any, token: str = "tenant-a") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers={"Authorization": f"Bearer {token}"},
    )


# -- key syntax and fingerprint (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ('"abc-123"', "abc-123"),
        ("abc-123", "abc-123"),
        ('  "with space"  ', "with space"),
        (r'"q\"uote\\d"', 'q"uote\\d'),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("k" * 255, "k" * 255),
    ],
)
def test_key_accepts_sf_string_and_bare_token(raw: str, key: str) -> None:
    assert parse_key(raw.encode()) == key


@pytest.mark.parametrize(
    "raw",
    [b"", b'""', b"k" * 256, b'"' + b"k" * 256 + b'"', b"two words", b'"open', b'"a";p=1',
     "caf\u00e9".encode(), b'"bad\\escape"', b"tab\there", b'"ctl\x01"'],
)
def test_key_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_key(raw)
    assert "Idempotency-Key" in info.value.detail
    assert info.value.status == 400


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
               max_size=255))
def test_key_round_trips_through_a_real_sf_serializer(value: str) -> None:
    """Whatever an RFC 8941 implementation (http-sfv) serializes, we read back exactly."""
    assert parse_key(str(http_sfv.Item(value)).encode()) == value
    if all(ch not in ' "\\' for ch in value):
        assert parse_key(value.encode()) == value  # the bare form of the same key


def test_fingerprint_is_length_prefixed_keyed_and_query_order_free() -> None:
    fp = Fingerprinter(b"s" * 32)
    assert fp("POST", "/orders/12", b"", b"3") != fp("POST", "/orders/1", b"", b"23")
    assert fp("POST", "/a", b"x=1&y=2", b"{}") == fp("POST", "/a", b"y=2&x=1", b"{}")
    assert fp("POST", "/a", b"x=1", b"{}") != fp("POST", "/a", b"x=2", b"{}")
    assert fp("POST", "/a", b"", b"{}") != Fingerprinter(b"t" * 32)("POST", "/a", b"", b"{}")
    assert Fingerprinter()("POST", "/a", b"", b"") != Fingerprinter()("POST", "/a", b"", b"")
    with pytest.raises(ValueError):
        Fingerprinter(b"short")


def test_config_validates_eagerly() -> None:
    with pytest.raises(ValueError):
        IdempotencyConfig(lease_seconds=0)
    with pytest.raises(ValueError):
        IdempotencyConfig(on_conflict="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IdempotencyConfig(lease_seconds=3, heartbeat_seconds=5)
    with pytest.raises(TypeError):
        IdempotencyConfig(methods="POST")
    assert IdempotencyConfig(methods=["post"]).methods == frozenset({"POST"})
    # A short secret failed first when Starlette built the middleware, on the first ASGI
    # call: uvicorn took it for "lifespan unsupported" and answered every request a bare 500.
    with pytest.raises(ValueError, match="16 bytes"):
        IdempotencyConfig(secret="change-me")
    assert IdempotencyConfig(secret="change-me-to-a-long-random-key").secret


def test_unstored_statuses_must_be_status_codes() -> None:
    # "429" was taken for its characters and 429 (a str set never matches a status) was
    # then stored and replayed to every retry; 429 alone failed with "'int' object is not
    # iterable".
    for bad in ("429", 429, ["429"], [429, 1000]):
        with pytest.raises(TypeError, match="unstored_statuses must be a collection"):
            IdempotencyConfig(unstored_statuses=bad)  # type: ignore[arg-type]
    assert IdempotencyConfig(unstored_statuses=[429, 409]).unstored_statuses == {429, 409}


def test_the_key_header_must_be_a_header_name() -> None:
    # Only an empty name or one with spaces at its ends was refused: "idem key" or
    # "idempotency-key:" were taken, a header no client can send (every keyed request then
    # went undeduplicated, or was a 400 with required=True).
    for bad in ("idem key", "idempotency-key:", "x\tkey", ""):
        with pytest.raises(ValueError, match=r"^header must be a header name"):
            IdempotencyConfig(header=bad)
    assert IdempotencyConfig(header="X-Request-Key").header == "X-Request-Key"


# -- stores: compare-and-set by owner ------------------------------------------------------------


def make_store(storage: Storage) -> MemoryIdempotencyStore | RedisIdempotencyStore:
    return MemoryIdempotencyStore() if storage.is_memory else RedisIdempotencyStore(storage)


async def test_store_only_owner_completes_or_releases(storage: Storage) -> None:
    store = make_store(storage)
    key = storage.key("idem", "p", "k1")
    assert isinstance(await store.claim(key, "fp", "owner1", 5), Claimed)
    held = await store.claim(key, "fp", "owner2", 5)
    assert isinstance(held, InFlight) and held.owner == "owner1" and held.fingerprint == "fp"
    record = Completed(status=200, headers=(("a", "b"),), body=b"\x00\xff", fingerprint="fp")
    assert not await store.complete(key, "owner2", record, 60)
    assert not await store.release(key, "owner2")
    assert not await store.heartbeat(key, "owner2", 5)
    assert await store.heartbeat(key, "owner1", 5)
    assert await store.complete(key, "owner1", record, 60)
    assert not await store.release(key, "owner1")  # completed: nothing to release
    again = await store.claim(key, "fp", "owner3", 5)
    assert isinstance(again, Completed) and again.body == b"\x00\xff" and again.status == 200


async def test_store_lease_expires_and_heartbeat_extends(storage: Storage) -> None:
    store = make_store(storage)
    attempts = iter(range(3))

    async def scenario() -> None:
        # 0.3 s leases keep this fast; an attempt whose "still held" checks came later than
        # the lease allows (a stalled machine, measured) is run again (see tests.stalls).
        key = storage.key("idem", "p", f"k2-{next(attempts)}")
        claimed = time.monotonic()
        assert isinstance(await store.claim(key, "fp", "o1", 0.3), Claimed)
        await asyncio.sleep(0.2)
        beat = time.monotonic()
        assert in_time(await store.heartbeat(key, "o1", 0.3), claimed, 0.3)
        await asyncio.sleep(0.2)  # past the first lease: only the heartbeat holds the key
        held = await store.claim(key, "fp", "o2", 0.3)
        assert in_time(isinstance(held, InFlight), beat, 0.3)  # extended
        await asyncio.sleep(0.35)
        assert isinstance(await store.claim(key, "fp", "o2", 0.3), Claimed)  # expired, taken over
        assert not await store.release(key, "o1")  # the old owner cannot delete the new lease

    await steady(scenario)


def test_memory_store_is_bounded() -> None:
    import time

    store = MemoryIdempotencyStore(max_bytes=10_000)
    for i in range(100):
        anyio.run(store.claim, f"k{i}", "fp", "o", 5)
        rec = Completed(status=200, headers=(), body=b"x" * 1000, fingerprint="fp",
                        stored_at=time.time())
        assert anyio.run(store.complete, f"k{i}", "o", rec, 60)
    assert store._bytes <= 10_000
    assert len(store._done) < 100


async def test_memory_store_bound_is_the_memory_it_holds() -> None:
    """``memory_max_bytes`` bounds the memory the records take, not just their text: filled
    with small answers (20 headers, a short body; or a stream of short chunks), the store
    holds at most ~its bound (counting the text alone, it held ~4-7 times the bound)."""
    bound = 2 * 1024 * 1024
    for chunks in (0, 40):
        store = MemoryIdempotencyStore(max_bytes=bound)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(6_000):
                key = f"aimw:idem:{{key_{i:032x}}}:{i:064x}"
                await store.claim(key, "f" * 64, "owner", 60)
                headers = tuple((f"x-header-{j}", f"value-{i}-{j}") for j in range(20))
                body = b'{"id": %d, "choices": []}' % i
                rec = Completed(
                    status=200, headers=headers, body=None if chunks else body,
                    chunks=tuple(b"data: %d\n\n" % j for j in range(chunks)) if chunks else None,
                    fingerprint=f"{i:064x}",
                )
                assert await store.complete(key, "owner", rec, 60)
                del rec
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert 100 < len(store._done) < 6_000  # full: the bound evicted the oldest
        assert held < 1.25 * bound, (chunks, held)


def test_memory_store_records_are_untracked_by_the_gc() -> None:
    """A completed record is held as plain data the garbage collector does not track: at
    the default 64 MiB of small chat answers (~12,000) a full collection walks nothing more
    (held as models they were 4 tracked objects each, ~30 ms more per full collection);
    read back, a record is the one stored, with the same fields set."""
    headers = (("content-type", "application/json"), ("x-request-id", "req_1"))

    def record(i: int) -> Completed:
        if i % 2:
            return Completed(status=200, headers=headers, body=b'{"id": %d}' % i,
                             fingerprint=f"{i:064x}")
        return Completed(status=200, headers=headers, fingerprint=f"{i:064x}",
                         chunks=tuple(b"data: %d\n\n" % j for j in range(5)))

    def fill(n: int) -> MemoryIdempotencyStore:
        store = MemoryIdempotencyStore()
        for i in range(n):
            anyio.run(store.claim, f"k{i}", "fp", "o", 60)
            assert anyio.run(store.complete, f"k{i}", "o", record(i), 600)
        return store

    assert tracked_per_entry(fill) < 0.01
    store = fill(2)
    for i in range(2):
        got = anyio.run(store.claim, f"k{i}", "fp", "x", 60)
        assert got == record(i).model_copy(update={"stored_at": got.stored_at})  # type: ignore[union-attr]
        assert got.model_fields_set == record(i).model_fields_set


def test_memory_store_expires_records_whatever_their_order() -> None:
    """A record kept longer does not keep shorter ones behind it: each goes (and frees its
    bytes) once its own retention has passed, as the next record is stored."""
    store = MemoryIdempotencyStore()

    def put(key: str, retention: float) -> None:
        anyio.run(store.claim, key, "fp", "o", 60)
        rec = Completed(status=200, headers=(), body=b"x" * 100, fingerprint="fp")
        assert anyio.run(store.complete, key, "o", rec, retention)

    put("long", 3600)
    for i in range(10):
        put(f"short{i}", 0.05)
    assert len(store._done) == 11
    time.sleep(0.1)
    put("new", 3600)
    assert list(store._done) == ["long", "new"]
    assert store._bytes == 2 * Completed(status=200, headers=(), body=b"x" * 100,
                                         fingerprint="fp").size
    assert isinstance(anyio.run(store.claim, "short1", "fp", "o2", 60), Claimed)


# -- the middleware ------------------------------------------------------------------------------


async def test_50_concurrent_identical_requests_run_once(storage: Storage) -> None:
    app, counts = build(storage, secret="s" * 32)
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.post("/chat?delay=0.3", content=b'{"q":1}', headers=KEY) for _ in range(50))
        )
        await asyncio.sleep(0.05)
        late = await c.post("/chat?delay=0.3", content=b'{"q":1}', headers=KEY)
    assert counts["chat"] == 1
    fresh = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(fresh) == 1
    for r in responses:
        if r.status_code == 409:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["error"]["code"] == "conflict"
            assert r.json()["retryable"] is True and r.headers["retry-after"] == "1"
        else:
            assert r.status_code == 201 and r.content == fresh[0].content
    assert late.status_code == 201 and late.headers["idempotent-replayed"] == "true"
    assert late.content == fresh[0].content


async def test_50_concurrent_with_waiting_all_get_the_result(storage: Storage) -> None:
    app, counts = build(storage, on_conflict="wait", wait_seconds=10, poll_interval=0.02)
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.post("/chat?delay=0.3", content=b"{}", headers=KEY) for _ in range(50))
        )
    assert counts["chat"] == 1
    assert all(r.status_code == 201 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 49


async def test_replay_is_byte_for_byte(storage: Storage) -> None:
    app, counts = build(storage)
    async with client(app) as c:
        first = await c.post("/chat", content=b"hello", headers=KEY)
        second = await c.post("/chat", content=b"hello", headers={"Idempotency-Key": KEY[
            "Idempotency-Key"].strip('"')})  # bare and quoted forms name the same key
    assert counts["chat"] == 1
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.content == second.content
    assert second.headers["x-model"] == "fake-1"
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert second.headers["x-request-id"] != first.headers["x-request-id"]


async def test_handler_that_raises_releases_the_key(storage: Storage) -> None:
    app, counts = build(storage)
    async with client(app) as c:
        first = await c.post("/boom", headers=KEY)
        retry = await c.post("/boom", headers=KEY)
        replay = await c.post("/boom", headers=KEY)
    assert first.status_code == 500 and first.json()["error"]["code"] == "internal"
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert replay.headers["idempotent-replayed"] == "true"
    assert counts["boom"] == 2


@pytest.mark.parametrize(("code", "stored"), [(404, True), (400, True), (429, False),
                                              (409, False), (500, False), (503, False)])
async def test_which_statuses_are_stored(storage: Storage, code: int, stored: bool) -> None:
    app, counts = build(storage)
    async with client(app) as c:
        await c.post(f"/status/{code}", headers=KEY)
        again = await c.post(f"/status/{code}", headers=KEY)
    assert again.status_code == code
    assert counts[f"status{code}"] == (1 if stored else 2)
    assert (again.headers.get("idempotent-replayed") == "true") is stored


async def test_storing_server_errors_is_opt_in() -> None:
    app, counts = build("memory://", store_server_errors=True)
    async with client(app) as c:
        await c.post("/status/503", headers=KEY)
        again = await c.post("/status/503", headers=KEY)
    assert counts["status503"] == 1 and again.headers["idempotent-replayed"] == "true"


async def test_same_key_other_tenant_is_independent(storage: Storage) -> None:
    app, counts = build(storage)
    async with client(app, "tenant-a") as a, client(app, "tenant-b") as b:
        ra = await a.post("/chat", content=b"a", headers=KEY)
        rb = await b.post("/chat", content=b"b", headers=KEY)  # other body: no 422 either
        ra2 = await a.post("/chat", content=b"a", headers=KEY)
    assert counts["chat"] == 2
    assert ra.json()["run"] == 1 and rb.json()["run"] == 2
    assert "idempotent-replayed" not in rb.headers
    assert ra2.json() == ra.json() and ra2.headers["idempotent-replayed"] == "true"


async def test_same_key_different_request_is_422(storage: Storage) -> None:
    app, counts = build(storage)
    async with client(app) as c:
        await c.post("/chat?x=1", content=b'{"a":1}', headers=KEY)
        body = await c.post("/chat?x=1", content=b'{"a":2}', headers=KEY)
        query = await c.post("/chat?x=2", content=b'{"a":1}', headers=KEY)
        same = await c.post("/chat?x=1", content=b'{"a":1}', headers=KEY)
    for r in (body, query):
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["error"]["code"] == "idempotency_key_reused"
        assert '{"a":1}' not in r.text
    assert same.status_code == 201 and counts["chat"] == 1


async def test_same_key_with_another_undecodable_query_value_is_422(storage: Storage) -> None:
    # Two percent-escapes that are not UTF-8 (%FF, %FE) are two different requests: they
    # were both read as U+FFFD, so the second was answered with the first one's replay.
    app, counts = build(storage)
    async with client(app) as c:
        first = await c.post("/chat?x=%FF", content=b'{"a":1}', headers=KEY)
        other = await c.post("/chat?x=%FE", content=b'{"a":1}', headers=KEY)
        same = await c.post("/chat?x=%FF", content=b'{"a":1}', headers=KEY)
    assert first.status_code == 201
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert same.status_code == 201 and same.headers["idempotent-replayed"] == "true"
    assert counts["chat"] == 1
    fp = Fingerprinter(b"s" * 32)
    assert fp("POST", "/a", b"x=%C3%A9", b"") == fp("POST", "/a", "x=é".encode(), b"")
    assert fp("POST", "/a", b"x=a+b", b"") == fp("POST", "/a", b"x=a%20b", b"")


async def test_invalid_key_is_400_and_missing_required_key_is_400() -> None:
    app, counts = build("memory://", required=True)
    async with client(app) as c:
        invalid = await c.post("/chat", headers={"Idempotency-Key": "k" * 256})
        quoted = await c.post("/chat", headers={"Idempotency-Key": '"unterminated'})
        missing = await c.post("/chat")
        other_method = await c.get("/chat")
    for r in (invalid, quoted, missing):
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_request"
        assert r.json()["error"]["param"] == "Idempotency-Key"
    assert "255" in invalid.json()["detail"] and "requires" in missing.json()["detail"]
    assert other_method.status_code == 405  # GET is not deduplicated, passes through
    assert counts["chat"] == 0


async def test_no_key_passes_through_when_optional() -> None:
    app, _ = build("memory://")
    async with client(app) as c:
        r1 = await c.post("/chat")
        r2 = await c.post("/chat")
    assert (r1.json()["run"], r2.json()["run"]) == (1, 2)


# -- event streams -------------------------------------------------------------------------------


async def call_raw(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], on_message: Any = None,
    disconnect: anyio.Event | None = None,
) -> list[dict[str, Any]]:
    """Drive the ASGI app directly and record every ``send`` message (no joining)."""
    messages: list[dict[str, Any]] = []
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect is not None:
            await disconnect.wait()
        else:
            await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if on_message is not None:
            await on_message(message)

    path, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "client": ("127.0.0.1", 1), "server": ("t", 80),
        "headers": [(b"host", b"t"), (b"authorization", b"Bearer tenant-a"), *headers],
    }
    await app(scope, receive, send)
    return messages


def live_app(storage: Storage, gate: anyio.Event, **options: Any) -> tuple[Any, list[str]]:
    log: list[str] = []

    async def endpoint(request: Request) -> Response:
        log.append("run")

        async def gen() -> AsyncIterator[str]:
            yield "id: 0\ndata: first\n\n"
            log.append("waiting")
            await gate.wait()  # only the client having received event 0 opens the gate
            yield "id: 1\ndata: second\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/s", endpoint, methods=["POST"])])
    return RequestContextMiddleware(IdempotencyMiddleware(app, storage=storage, **options)), log


async def test_stream_is_sent_live_while_recorded_then_replayed(storage: Storage) -> None:
    gate = anyio.Event()
    app, log = live_app(storage, gate)
    key = [(b"idempotency-key", b"stream-1")]

    async def on_message(message: dict[str, Any]) -> None:
        if message.get("body") == b"id: 0\ndata: first\n\n":
            assert log == ["run"]  # the first event went out before the handler went on
            gate.set()

    first = await call_raw(app, "/s", key, on_message)
    bodies = [m["body"] for m in first if m["type"] == "http.response.body" and m["body"]]
    assert bodies == [b"id: 0\ndata: first\n\n", b"id: 1\ndata: second\n\n"]
    second = await call_raw(app, "/s", key)
    assert log == ["run", "waiting"]
    start = second[0]
    assert start["status"] == 200
    assert (b"idempotent-replayed", b"true") in start["headers"]
    assert [m["body"] for m in second[1:] if m["body"]] == bodies  # one message per event
    assert second[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """A real uvicorn server on a free port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True


async def sse_events(c: httpx.AsyncClient, url: str) -> tuple[list[tuple[str, str, str]], Any]:
    async with aconnect_sse(c, "POST", url, headers={"Idempotency-Key": "sse-key-1"}) as es:
        events = [(e.id, e.event, e.data) async for e in es.aiter_sse()]
        return events, es.response.headers


async def test_stream_replay_parsed_by_httpx_sse(storage: Storage) -> None:
    app, counts = build(storage)
    async with serve(app) as base, httpx.AsyncClient(
        base_url=base, headers={"Authorization": "Bearer t"}
    ) as c:
        first, h1 = await sse_events(c, "/stream?n=5")
        second, h2 = await sse_events(c, "/stream?n=5")
    assert counts["stream"] == 1
    assert first == [(str(i), "delta", json.dumps({"i": i})) for i in range(5)]
    assert second == first
    assert h2["content-type"].startswith("text/event-stream")
    assert h2["idempotent-replayed"] == "true" and "idempotent-replayed" not in h1


async def test_broken_stream_is_not_stored(storage: Storage) -> None:
    app, counts = build(storage)
    async with client(app) as c:
        broken = await c.post("/stream?n=3&fail_at=1", headers=KEY)
        retry = await c.post("/stream?n=3&fail_at=1", headers=KEY)
    # (a foreign event stream broken at an event boundary ends with its error event)
    assert broken.status_code == 200 and broken.text.count("event: delta") == 1
    last = broken.text.rstrip("\n").rsplit("\n", 2)[-2:]
    assert last[0] == "event: error" and json.loads(last[1][6:])["error"]["code"] == "internal"
    assert counts["stream"] == 2
    assert retry.status_code == 200 and retry.text.count("event: delta") == 3
    assert "idempotent-replayed" not in retry.headers


async def test_a_stream_ending_in_an_error_event_is_not_stored(storage: Storage) -> None:
    # The 200 and the first event went out, then the source failed: the stream ends with an
    # error event, normally at the ASGI level. A retry must run again, not replay the error.
    app, counts = build(storage)
    async with client(app) as c:
        failed = await c.post("/sse", headers=KEY)
        assert failed.status_code == 200 and "upstream_unavailable" in failed.text
        retry = await c.post("/sse", headers=KEY)
        again = await c.post("/sse", headers=KEY)
    assert counts["sse"] == 2
    assert "idempotent-replayed" not in retry.headers and "second" in retry.text
    assert "upstream_unavailable" not in retry.text
    assert again.headers["idempotent-replayed"] == "true" and again.text == retry.text


async def test_client_disconnect_before_the_end_releases_the_key() -> None:
    gate, gone = anyio.Event(), anyio.Event()
    app, log = live_app(Storage("memory://"), gate)
    key = [(b"idempotency-key", b"stream-2")]

    async def on_message(message: dict[str, Any]) -> None:
        if message.get("body", b"").startswith(b"id: 0"):
            gone.set()  # the client goes away after the first event

    await call_raw(app, "/s", key, on_message, disconnect=gone)
    gate.set()
    again = await call_raw(app, "/s", key)
    assert log.count("run") == 2
    assert (b"idempotent-replayed", b"true") not in again[0]["headers"]


async def test_oversized_response_passes_through_marked_not_stored() -> None:
    app, counts = build("memory://", max_record_bytes=200)
    async with client(app) as c:
        big = await c.post("/chat", content=b"x" * 500, headers=KEY)
        again = await c.post("/chat", content=b"x" * 500, headers=KEY)
        stream = await c.post("/stream?n=50", headers={"Idempotency-Key": "s"})
        stream2 = await c.post("/stream?n=50", headers={"Idempotency-Key": "s"})
    assert big.status_code == 201 and big.headers["idempotent-stored"] == "false"
    assert big.json()["echo"] == "x" * 500
    assert counts["chat"] == 2 and "idempotent-replayed" not in again.headers
    assert stream.text == stream2.text and counts["stream"] == 2  # streamed past the cap


async def test_a_response_of_more_than_half_the_bound_is_stored() -> None:
    # The declared Content-Length was counted, then each body chunk again: a response of
    # more than half of max_record_bytes was not stored, nor marked so (in front of a real
    # embeddings model, an answer of 629 KB ran the model again on each retry).
    app, counts = build("memory://", max_record_bytes=1000)
    async with client(app) as c:
        first = await c.post("/chat", content=b"x" * 600, headers=KEY)
        again = await c.post("/chat", content=b"x" * 600, headers=KEY)
        ran = counts["chat"]
        over = await c.post("/chat", content=b"x" * 1000, headers={"Idempotency-Key": "o"})
    assert 600 < len(first.content) < 1000 and "idempotent-stored" not in first.headers
    assert ran == 1 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert over.headers["idempotent-stored"] == "false"  # past the bound: marked


# -- store down ----------------------------------------------------------------------------------


def dead_storage() -> Storage:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Storage(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)


async def test_store_down_is_a_typed_503_by_default() -> None:
    app, counts = build(dead_storage())
    async with client(app) as c:
        r = await c.post("/chat", headers=KEY)
        no_key = await c.post("/chat")
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert r.headers["retry-after"] == "1" and counts["chat"] == 1
    assert no_key.status_code == 201


async def test_store_down_fail_open_serves_unstored() -> None:
    app, counts = build(dead_storage(), on_store_error="open")
    async with client(app) as c:
        r = await c.post("/chat", headers=KEY)
    assert r.status_code == 201 and r.headers["idempotent-stored"] == "false"
    assert counts["chat"] == 1


# -- the decorator -------------------------------------------------------------------------------


class Answer(BaseModel):
    text: str
    run: int


async def test_decorator_on_fastapi_endpoint_without_request_param(storage: Storage) -> None:
    runs: list[int] = []
    app = FastAPI()

    @app.post("/answer", status_code=201, response_model=Answer)
    @idempotent(storage=storage, required=True)
    async def answer(prompt: str) -> dict[str, Any]:
        runs.append(1)
        return {"text": prompt.upper(), "run": len(runs), "secret": "dropped by response_model"}

    @app.post("/sync")
    @idempotent(storage=storage)
    def sync_endpoint() -> dict[str, int]:
        runs.append(1)
        return {"run": len(runs)}

    @app.post("/echo")
    @idempotent(storage=storage)
    async def echo(body: Answer, n: int = 0) -> Answer:  # string annotations (__future__)
        runs.append(1)
        return Answer(text=body.text * (n + 1), run=len(runs))

    install(app)
    async with client(app) as c:
        e1 = await c.post("/echo?n=1", json={"text": "ab", "run": 0}, headers=KEY)
        e2 = await c.post("/echo?n=1", json={"text": "ab", "run": 0}, headers=KEY)
        first = await c.post("/answer?prompt=hi", headers=KEY)
        second = await c.post("/answer?prompt=hi", headers=KEY)
        other = await c.post("/answer?prompt=ho", headers=KEY)
        missing = await c.post("/answer?prompt=hi")
        s1 = await c.post("/sync", headers=KEY)
        s2 = await c.post("/sync", headers=KEY)
    assert first.status_code == 201 and first.json() == {"text": "HI", "run": 2}
    assert second.content == first.content and second.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and missing.status_code == 400
    assert s1.json() == s2.json() == {"run": 3} and s2.headers["idempotent-replayed"] == "true"
    assert e1.json() == e2.json() == {"text": "abab", "run": 1}
    assert e2.headers["idempotent-replayed"] == "true"
    assert len(runs) == 3


async def test_decorator_keeps_what_the_endpoint_set_on_fastapis_response(
    storage: Storage,
) -> None:
    # With a key, the decorator rendered the result itself and dropped FastAPI's
    # sub-response: the status, headers and cookies the endpoint set, and @rate_limit's
    # headers under it, were missing from the first answer and from every replay.
    app = FastAPI()

    @app.post("/own")
    @idempotent(storage=storage)
    async def own(body: dict[str, Any], response: Response) -> dict[str, int]:
        response.status_code = 201
        response.headers["x-mine"] = "1"
        response.set_cookie("c", "v")
        return {"ok": 1}

    @app.post("/stacked")
    @idempotent(storage=storage)
    @rate_limit(Policy(requests="30/minute"), storage=storage)
    async def stacked(body: dict[str, Any]) -> dict[str, int]:
        return {"ok": 1}

    install(app)
    async with client(app) as c:
        for path in ("/own", "/stacked"):
            plain = await c.post(path, json={})
            first = await c.post(path, json={}, headers=KEY)
            replay = await c.post(path, json={}, headers=KEY)
            assert replay.headers["idempotent-replayed"] == "true"
            for r in (first, replay):
                assert r.status_code == plain.status_code and r.content == plain.content
                if path == "/own":
                    assert r.status_code == 201 and r.headers["x-mine"] == "1"
                    assert r.headers["set-cookie"].startswith("c=v")
                else:  # (the replay shows the headers of the answer it replays)
                    assert r.headers["x-ratelimit-remaining-requests"] == "28"


async def test_decorator_sends_no_body_with_a_204(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    # The result was rendered as "null" under a 204 (set on FastAPI's Response, or declared):
    # uvicorn refused the body ("Too much data for declared Content-Length", logged) and the
    # replay reset the connection.
    app = FastAPI()

    @app.post("/set")
    @idempotent(storage=storage)
    async def set_on_response(response: Response) -> None:
        response.status_code = 204

    @app.post("/declared", status_code=204)
    @idempotent(storage=storage)
    async def declared() -> None:
        return None

    install(app)
    uvicorn_log = logging.getLogger("uvicorn.error")  # (it does not propagate to the root)
    uvicorn_log.addHandler(caplog.handler)
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:  # (a real server)
            for path in ("/set", "/declared"):
                first = await c.post(path, headers=KEY)
                replay = await c.post(path, headers=KEY)
                assert (first.status_code, first.content) == (204, b"")
                assert (replay.status_code, replay.content) == (204, b"")
                assert replay.headers["idempotent-replayed"] == "true"
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_decorator_on_starlette_endpoint_releases_on_error(storage: Storage) -> None:
    runs: list[int] = []

    @idempotent(storage=storage)
    async def endpoint(request: Request) -> Response:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("first try fails")
        return JSONResponse({"run": len(runs)})

    app = install(Starlette(routes=[Route("/e", endpoint, methods=["POST"])]))
    async with client(app) as c:
        failed = await c.post("/e", headers=KEY)
        ok = await c.post("/e", headers=KEY)
        replay = await c.post("/e", headers=KEY)
    assert failed.status_code == 500
    assert ok.json() == {"run": 2} and replay.json() == {"run": 2}
    assert replay.headers["idempotent-replayed"] == "true" and len(runs) == 2


async def test_decorator_under_the_middleware_on_one_store(storage: Storage) -> None:
    # The README shows the middleware for the app "or" the decorator on one endpoint; with
    # both on one store (say, the decorator to require the key on that endpoint), the
    # decorator found the middleware's own lease for the same request and answered 409:
    # every keyed request to the endpoint was a 409, retries included.
    runs: list[int] = []
    app = FastAPI()

    @app.post("/both")
    @idempotent(storage=storage, required=True)
    async def both(body: dict[str, Any]) -> dict[str, int]:
        runs.append(1)
        return {"run": len(runs)}

    install(app, storage=storage, idempotency=IdempotencyConfig())
    async with client(app) as c:
        first = await c.post("/both", json={"a": 1}, headers=KEY)
        replay = await c.post("/both", json={"a": 1}, headers=KEY)
        other = await c.post("/both", json={"a": 2}, headers=KEY)
        missing = await c.post("/both", json={"a": 1})
    assert first.status_code == 200 and first.json() == {"run": 1}
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and missing.status_code == 400
    assert len(runs) == 1


# -- following a live stream ---------------------------------------------------------------------


async def test_duplicate_follows_the_live_stream_from_its_start(storage: Storage) -> None:
    gate, a_first, b_first = anyio.Event(), anyio.Event(), anyio.Event()
    app, log = live_app(storage, gate, follow_streams=True, poll_interval=0.01)
    key = [(b"idempotency-key", b"follow-1")]
    results: dict[str, list[dict[str, Any]]] = {}

    def seen(event: anyio.Event) -> Any:
        async def on_message(message: dict[str, Any]) -> None:
            if message.get("body", b"").startswith(b"id: 0"):
                event.set()

        return on_message

    async def original() -> None:
        results["a"] = await call_raw(app, "/s", key, seen(a_first))

    async def duplicate() -> None:
        await a_first.wait()
        results["b"] = await call_raw(app, "/s", key, seen(b_first))

    async with anyio.create_task_group() as tg:
        tg.start_soon(original)
        tg.start_soon(duplicate)
        with anyio.fail_after(5):
            await b_first.wait()
        assert results == {}  # the duplicate got event 0 while the original still streams
        gate.set()
    assert log == ["run", "waiting"]
    bodies = [m["body"] for m in results["a"] if m.get("body")]
    assert [m["body"] for m in results["b"] if m.get("body")] == bodies
    assert len(bodies) == 2
    assert (b"idempotent-replayed", b"true") in results["b"][0]["headers"]
    assert results["b"][-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_followers_are_cut_when_the_original_breaks(storage: Storage) -> None:
    gate, a_first = anyio.Event(), anyio.Event()
    app, _ = live_app(storage, gate, follow_streams=True, poll_interval=0.01)
    key = [(b"idempotency-key", b"follow-2")]
    follower: list[dict[str, Any]] = []

    async def on_a(message: dict[str, Any]) -> None:
        if message.get("body", b"").startswith(b"id: 0"):
            a_first.set()

    async def original() -> None:
        with anyio.CancelScope() as scope:
            cancel["a"] = scope
            await call_raw(app, "/s", key, on_a)

    async def duplicate() -> None:
        await a_first.wait()
        with pytest.raises(Conflict):
            await call_raw(app, "/s", key, on_message=lambda m: _append(follower, m))

    cancel: dict[str, anyio.CancelScope] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(original)
        tg.start_soon(duplicate)
        with anyio.fail_after(5):
            await a_first.wait()
            while not follower:  # noqa: ASYNC110 - wait for the follower's start
                await anyio.sleep(0.01)
            cancel["a"].cancel()  # the original dies mid-stream: its lease is released
    assert follower[0]["type"] == "http.response.start"
    assert not any(m.get("more_body") is False for m in follower)  # never ended as complete


async def _append(messages: list[dict[str, Any]], message: dict[str, Any]) -> None:
    messages.append(message)


async def test_store_lost_mid_request_still_answers_and_a_retry_runs() -> None:
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    storage = Storage(server.url, socket_timeout=5)  # (stopped, it refuses at once)
    runs: list[int] = []

    async def endpoint(request: Request) -> Response:
        runs.append(1)
        if len(runs) == 1:
            await anyio.to_thread.run_sync(server.stop)  # the store dies mid-request
        return JSONResponse({"run": len(runs)})

    app = install(Starlette(routes=[Route("/e", endpoint, methods=["POST"])]),
                  storage=storage, idempotency=IdempotencyConfig())
    try:
        async with client(app) as c:
            first = await c.post("/e", headers=KEY)  # completing fails: logged, not a 500
            down = await c.post("/e", headers=KEY)
            server.start()
            retry = await c.post("/e", headers=KEY)
    finally:
        await storage.aclose()
        server.stop()
    assert first.status_code == 200 and first.json() == {"run": 1}
    assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
    assert retry.status_code == 200 and retry.json() == {"run": 2}


# -- the lease is kept alive only while it must be ----------------------------------------------


async def test_a_handler_outliving_its_lease_keeps_it_and_runs_once(storage: Storage) -> None:
    # The lease is 1 s, renewed every 0.25 s: it survives an event-loop stall of up to 0.75 s
    # (a loaded CI box once stalled past a 0.3 s lease renewed every 0.1 s). A longer stall
    # lets the lease lapse as designed; such an attempt is run again (tests.stalls).
    async def scenario() -> None:
        key = {"Idempotency-Key": f'"{uuid.uuid4()}"'}  # a fresh key per attempt
        app, counts = build(storage, lease_seconds=1.0, heartbeat_seconds=0.25, secret="s" * 32)
        async with client(app) as c:
            first = asyncio.create_task(c.post("/chat?delay=4.0", content=b"{}", headers=key))
            dupes = []
            for _ in range(3):
                await asyncio.sleep(1.05)  # each past one lease
                dupes.append(await c.post("/chat?delay=4.0", content=b"{}", headers=key))
            done = await first
            replay = await c.post("/chat?delay=4.0", content=b"{}", headers=key)
        assert counts["chat"] == 1
        assert [d.status_code for d in dupes] == [409, 409, 409]
        assert done.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
        assert replay.content == done.content

    await steady(scenario, stall=0.5)


class CountingStore(MemoryIdempotencyStore):
    def __init__(self) -> None:
        super().__init__()
        self.beats = 0

    async def heartbeat(self, key: str, owner: str, lease: float) -> bool:
        self.beats += 1
        return await super().heartbeat(key, owner, lease)


async def ticking(scope: Any, receive: Any, send: Any) -> None:
    """A raw ASGI endpoint (runs on asyncio and trio): sleeps ``x-sleep`` seconds."""
    await receive()
    await anyio.sleep(float(dict(scope["headers"]).get(b"x-sleep", b"0")))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def drive(app: Any, sleep: bytes, key: bytes) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    done = anyio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/t", "raw_path": b"/t", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
        "headers": [(b"idempotency-key", key), (b"authorization", b"Bearer t"),
                    (b"x-sleep", sleep)],
    }
    await app(scope, receive, send)
    return sent


async def run_lease_scenario() -> tuple[int, int, list[int]]:
    """A short request (no renewal), then a long one with duplicates arriving meanwhile.

    The lease (1 s, renewed every 0.25 s) leaves room for a stalled event loop on a loaded box.
    """
    store = CountingStore()
    app = RequestContextMiddleware(IdempotencyMiddleware(
        ticking, store=store, lease_seconds=1.0, heartbeat_seconds=0.25, secret="s" * 32
    ))
    await drive(app, b"0", b"short")
    short_beats = store.beats
    statuses: list[int] = []

    async def duplicates() -> None:
        for _ in range(3):
            await anyio.sleep(1.05)  # each past one lease
            statuses.append((await drive(app, b"0", b"long"))[0]["status"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(duplicates)
        first = await drive(app, b"4.0", b"long")
    statuses.append(first[0]["status"])
    statuses.append(dict((await drive(app, b"0", b"long"))[0]["headers"]).get(
        b"idempotent-replayed", b"").decode() == "true")
    return short_beats, store.beats, statuses


async def check_lease_scenario() -> None:
    short_beats, beats, statuses = await run_lease_scenario()
    assert short_beats == 0  # a request shorter than one interval never renews
    assert beats >= 5  # ~0.25 s interval over 4 s
    assert statuses == [409, 409, 409, 200, True]


async def test_renewal_is_lazy_and_keeps_a_long_lease_on_asyncio() -> None:
    before = len(asyncio.all_tasks())
    await steady(check_lease_scenario, stall=0.5)  # (a stall past the lease: run again)
    assert len(asyncio.all_tasks()) == before  # no renewing task outlives its request


def test_renewal_keeps_a_long_lease_on_trio() -> None:
    anyio.run(functools.partial(steady, check_lease_scenario, stall=0.5), backend="trio")
