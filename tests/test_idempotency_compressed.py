"""Replays of compressed responses: a GZipMiddleware added before ``install()`` sits inside
the stack, so the idempotency layer stores what it compressed for the first request. A retry
gets those bytes only if its ``Accept-Encoding`` takes them; else they are sent decoded."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from aimiddleware import IdempotencyConfig, StackConfig, Storage, install
from aimiddleware._encoding import accepts
from aimiddleware.idempotency.models import Completed, LiveStream
from aimiddleware.idempotency.replay import follow

ANSWER = {"choices": [{"message": {"content": "Idempotent retries replay the answer. " * 20}}]}
EVENTS = [b"id: %d\ndata: {\"i\": %d}\n\n" % (i, i) for i in range(3)]


def make_app(storage: Storage) -> tuple[Any, list[str]]:
    runs: list[str] = []

    async def chat(request: Request) -> Response:
        runs.append("chat")
        return JSONResponse(ANSWER)  # (well over GZipMiddleware's 500-byte minimum)

    async def stream(request: Request) -> Response:
        # a stream compressed as it goes (GZipMiddleware leaves streams alone; this may not)
        runs.append("stream")

        async def gen() -> AsyncIterator[bytes]:
            packer = zlib.compressobj(wbits=31)
            for event in EVENTS:
                yield packer.compress(event) + packer.flush(zlib.Z_SYNC_FLUSH)
            yield packer.flush()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"content-encoding": "gzip"})

    app = Starlette(routes=[Route("/chat", chat, methods=["POST"]),
                            Route("/stream", stream, methods=["POST"])])
    app.add_middleware(GZipMiddleware)
    install(app, StackConfig(storage=storage, idempotency=IdempotencyConfig()))
    return app, runs


async def post(c: httpx.AsyncClient, path: str, accept: str | None) -> tuple[httpx.Response, bytes]:
    """The response and its bytes as they came (not decoded by httpx)."""
    headers = {"idempotency-key": f"key-{path}", "authorization": "Bearer k"}
    if accept is not None:
        headers["accept-encoding"] = accept
    async with c.stream("POST", path, json={"q": 1}, headers=headers) as r:
        return r, b"".join([part async for part in r.aiter_raw()])


def client(app: Any) -> httpx.AsyncClient:
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
    del c.headers["accept-encoding"]  # (httpx sends one by default; the tests say which)
    return c


@pytest.mark.parametrize(("accept", "gets_gzip"), [
    ("gzip", True), ("gzip, deflate, br", True), ("*", True), ("br, *;q=0.5", True),
    ("identity", False), (None, False), ("gzip;q=0", False), ("*;q=0", False), ("br", False),
    ("deflate", False), ("*, gzip;q=0", False),
])
async def test_a_gzip_replay_is_sent_decoded_to_a_retry_that_does_not_accept_gzip(
    storage: Storage, accept: str | None, gets_gzip: bool
) -> None:
    app, runs = make_app(storage)
    async with client(app) as c:
        first, stored = await post(c, "/chat", "gzip")
        retry, raw = await post(c, "/chat", accept)
    assert first.headers["content-encoding"] == "gzip"
    assert runs == ["chat"] and retry.headers["idempotent-replayed"] == "true"
    if gets_gzip:  # the stored bytes, as they were sent
        assert retry.headers["content-encoding"] == "gzip" and raw == stored
        assert retry.headers["content-length"] == first.headers["content-length"]
    else:
        assert "content-encoding" not in retry.headers
        assert raw == gzip.decompress(stored) and json.loads(raw) == ANSWER
        assert retry.headers["content-length"] == str(len(raw))


@pytest.mark.parametrize(("accept", "gets_gzip"), [("gzip", True), ("identity", False)])
async def test_a_gzip_stream_replay_is_sent_decoded_to_a_retry_that_does_not_accept_gzip(
    storage: Storage, accept: str, gets_gzip: bool
) -> None:
    app, runs = make_app(storage)
    async with client(app) as c:
        first, stored = await post(c, "/stream", "gzip")
        retry, raw = await post(c, "/stream", accept)
    assert first.headers["content-encoding"] == "gzip"
    assert gzip.decompress(stored) == b"".join(EVENTS)
    assert runs == ["stream"] and retry.headers["idempotent-replayed"] == "true"
    if gets_gzip:
        assert retry.headers["content-encoding"] == "gzip" and raw == stored
    else:
        assert "content-encoding" not in retry.headers and raw == b"".join(EVENTS)


@pytest.mark.parametrize(("header", "coding", "accepted"), [
    (b"gzip", b"gzip", True), (b"GZIP;Q=1.0", b"gzip", True), (b"x-gzip", b"gzip", True),
    (b"gzip;q=0.001", b"gzip", True), (b"gzip;q=0", b"gzip", False),
    (b"gzip;q=0.000", b"gzip", False), (b"gzip;q=nope", b"gzip", False),
    (b"identity", b"gzip", False), (b"*", b"deflate", True), (b"*;q=0", b"deflate", False),
    (b"deflate;q=0, *", b"deflate", False), (b"br , deflate ;q=0.5", b"deflate", True),
    (b"", b"gzip", False),
])
def test_accept_encoding_is_read_with_its_weights(
    header: bytes, coding: bytes, accepted: bool
) -> None:
    assert accepts([(b"accept-encoding", header)], coding) is accepted


def test_a_request_without_accept_encoding_accepts_no_coding() -> None:
    assert accepts([(b"content-type", b"application/json")], b"gzip") is False


class Finished:
    """A store whose stream has finished by the time a follower reads it again."""

    def __init__(self, chunks: tuple[bytes, ...]) -> None:
        self.chunks = chunks

    async def stream_read(self, key: str, offset: int) -> Completed:
        return Completed(status=200, headers=(), chunks=self.chunks, fingerprint="f")


@pytest.mark.parametrize(("accept", "gets_gzip"), [(b"gzip", True), (b"identity", False)])
async def test_a_follower_of_a_live_gzip_stream_gets_it_decoded_unless_it_accepts_gzip(
    accept: bytes, gets_gzip: bool
) -> None:
    packer = zlib.compressobj(wbits=31)
    chunks = (*(packer.compress(e) + packer.flush(zlib.Z_SYNC_FLUSH) for e in EVENTS),
              packer.flush())
    live = LiveStream(status=200, chunks=chunks[:1], headers=(
        ("content-type", "text/event-stream"), ("content-encoding", "gzip")))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await follow(Finished(chunks), "k", live, send, 0.01,  # type: ignore[arg-type]
                 [(b"accept-encoding", accept)])
    names = {k for k, _ in sent[0]["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    if gets_gzip:
        assert b"content-encoding" in names and body == b"".join(chunks)
    else:
        assert b"content-encoding" not in names and body == b"".join(EVENTS)


async def test_a_gzip_answer_of_several_members_is_replayed_decoded_whole() -> None:
    # A stored gzip body of two members (RFC 1952 2.2: an upstream's gzip passed on, made
    # by `cat a.gz b.gz`) was decoded to its first member for a retry that does not accept
    # gzip: the replay ended half-way through the JSON.
    raw = json.dumps(ANSWER).encode()
    packed = gzip.compress(raw[:300]) + gzip.compress(raw[300:])
    runs: list[str] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        runs.append("chat")
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-encoding", b"gzip")]})
        await send({"type": "http.response.body", "body": packed})

    app = Starlette()
    app.mount("/chat", upstream)
    install(app, StackConfig(storage=Storage("memory://"), idempotency=IdempotencyConfig()))
    async with client(app) as c:
        _, stored = await post(c, "/chat/", "gzip")
        retry, decoded = await post(c, "/chat/", "identity")
    assert stored == packed and runs == ["chat"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert "content-encoding" not in retry.headers and json.loads(decoded) == ANSWER
