"""Usage read from compressed responses: a GZipMiddleware added before ``install()`` sits
inside the stack, so the usage layer holds gzip bytes (httpx and the openai SDK ask for gzip
by default). It reads a decoded copy and sends the compressed bytes unchanged."""

from __future__ import annotations

import gzip
import json
import random
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

from aimiddleware import MemoryLedger, Policy, RateLimiter, StackConfig, Storage, UsageConfig
from aimiddleware import install as install_stack
from aimiddleware.context_middleware import RequestContextMiddleware
from aimiddleware.usage.middleware import UsageMiddleware
from tests.ratelimit_helpers import counters
from tests.test_usage_middleware import STREAM_EVENTS, Recorder, scope_for, sse_lines

COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Rate limits bound what one caller may spend. " * 20}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 25, "total_tokens": 37},
}
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def chat(request: Request) -> Response:
    return JSONResponse(COMPLETION)  # (well over GZipMiddleware's 500-byte minimum)


async def test_usage_of_a_gzip_response_is_read_and_charged_and_the_bytes_sent_unchanged(
    storage: Storage,
) -> None:
    limiter = RateLimiter(Policy(requests="100/minute", tokens="100000/minute"), storage=storage)
    ledger = MemoryLedger()
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.add_middleware(GZipMiddleware)
    install_stack(app, StackConfig(storage=storage, ratelimit=limiter,
                                   usage=UsageConfig(ledger=ledger)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t",
                                 headers={"authorization": "Bearer k1",
                                          "accept-encoding": "gzip"}) as c, c.stream(
        "POST", "/v1/chat/completions", json=REQUEST
    ) as r:
        raw = b"".join([part async for part in r.aiter_raw()])
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw)) == COMPLETION
    assert int(r.headers["content-length"]) == len(raw)
    assert (r.headers["x-usage-input-tokens"], r.headers["x-usage-output-tokens"]) == ("12", "25")
    assert r.headers["x-usage-finish-reason"] == "stop"
    # charged what the call used, not its reservation (the prompt plus 1024 estimated)
    assert (await counters(limiter, "k1"))["tokens:60"] == 37
    [(principal, _)] = ledger._requests
    [row] = await ledger.query(principal)
    assert (row.input_tokens, row.output_tokens) == (12, 25)


async def sent_by(app: Any, **usage: Any) -> tuple[list[dict[str, Any]], MemoryLedger]:
    """The messages the usage layer sends for ``app``, and its ledger."""
    ledger = MemoryLedger()
    rec = Recorder()
    scope, receive = scope_for("/x", json.dumps(REQUEST).encode())
    await RequestContextMiddleware(UsageMiddleware(app, ledger=ledger, **usage))(
        scope, receive, rec)
    return rec.messages, ledger


def body_app(body: bytes, coding: bytes, parts: int = 1) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-encoding", coding)]})
        step = -(-len(body) // parts)
        for i in range(parts):
            await send({"type": "http.response.body", "body": body[i * step:(i + 1) * step],
                        "more_body": i < parts - 1})

    return app


def deflate(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(wbits=wbits)
    return packer.compress(data) + packer.flush()


RAW = json.dumps(COMPLETION).encode()


@pytest.mark.parametrize(("coding", "body"), [
    (b"gzip", gzip.compress(RAW)),
    (b"x-gzip", gzip.compress(RAW)),
    (b"deflate", deflate(RAW, zlib.MAX_WBITS)),  # the zlib format, as RFC 9110 says
    (b"deflate", deflate(RAW, -zlib.MAX_WBITS)),  # raw deflate, as some servers send it
], ids=["gzip", "x-gzip", "deflate", "raw-deflate"])
@pytest.mark.parametrize("parts", [1, 3])
async def test_gzip_and_deflate_bodies_are_read_whole_or_in_parts(
    coding: bytes, body: bytes, parts: int
) -> None:
    messages, ledger = await sent_by(body_app(body, coding, parts))
    headers = dict(messages[0]["headers"])
    assert headers[b"x-usage-total-tokens"] == b"37"
    assert headers[b"content-encoding"] == coding
    assert b"".join(m.get("body", b"") for m in messages[1:]) == body
    assert len(ledger._requests) == 1


@pytest.mark.parametrize(("coding", "body"), [
    (b"br", b"\x1b\x00not really brotli"),  # not a coding the standard library reads
    (b"gzip", gzip.compress(RAW)[:-20]),  # cut short
    (b"gzip", b"not gzip at all"),
    (b"gzip, gzip", gzip.compress(gzip.compress(RAW))),  # two codings: not decoded
], ids=["br", "truncated", "corrupt", "two-codings"])
async def test_other_codings_and_broken_bodies_pass_unread(coding: bytes, body: bytes) -> None:
    messages, _ = await sent_by(body_app(body, coding))
    assert messages[0]["status"] == 200
    assert b"x-usage-total-tokens" not in dict(messages[0]["headers"])
    assert b"".join(m.get("body", b"") for m in messages[1:]) == body


async def test_a_body_that_decodes_past_the_bound_is_not_decoded_further() -> None:
    # 20 KiB of gzip that decodes to 20 MiB: only max_json_body + 1 bytes are ever decoded
    bomb = gzip.compress(b'{"usage": {"total_tokens": 1}, "pad": "' + b" " * (20 << 20) + b'"}')
    assert len(bomb) < 64 << 10
    messages, _ = await sent_by(body_app(bomb, b"gzip"), max_json_body=256 << 10)
    assert b"x-usage-total-tokens" not in dict(messages[0]["headers"])
    assert b"".join(m.get("body", b"") for m in messages[1:]) == bomb


def gzip_stream(coding: bytes = b"gzip") -> Any:
    """An event stream compressed as it goes (each event flushed), as a middleware that
    compresses streams would send it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"content-encoding", coding)]})
        packer = zlib.compressobj(wbits=31)
        for line in sse_lines(STREAM_EVENTS):
            await send({"type": "http.response.body", "more_body": True,
                        "body": packer.compress(line) + packer.flush(zlib.Z_SYNC_FLUSH)})
        await send({"type": "http.response.body", "body": packer.flush(), "more_body": False})

    return app


async def test_a_gzip_event_stream_is_read_from_a_decoded_copy() -> None:
    messages, ledger = await sent_by(gzip_stream())
    sent = b"".join(m.get("body", b"") for m in messages[1:])
    assert gzip.decompress(sent) == b"".join(sse_lines(STREAM_EVENTS))
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert (row.input_tokens, row.output_tokens, row.finish_reasons) == (12, 3, {"stop": 1})


async def test_an_event_stream_in_a_coding_not_read_passes_unread() -> None:
    messages, ledger = await sent_by(gzip_stream(b"br"))  # (labelled br: never decoded)
    assert messages[0]["status"] == 200 and messages[-1]["more_body"] is False
    assert len(ledger._requests) == 0  # no usage read: no row


async def test_starlette_gzip_leaves_an_event_stream_alone_and_its_usage_is_read() -> None:
    async def stream(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for line in sse_lines(STREAM_EVENTS):
                yield line

        return StreamingResponse(gen(), media_type="text/event-stream")

    ledger = MemoryLedger()
    app = Starlette(routes=[Route("/stream", stream, methods=["POST"])])
    app.add_middleware(GZipMiddleware, minimum_size=1)
    install_stack(app, usage=UsageConfig(ledger=ledger))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        r = await c.post("/stream", json=REQUEST, headers={"accept-encoding": "gzip"})
    assert r.status_code == 200 and "content-encoding" not in r.headers
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert (row.input_tokens, row.output_tokens) == (12, 3)


def embeddings_answer(n: int, tokens: int) -> dict[str, Any]:
    """An OpenAI embeddings answer of ``n`` vectors of 384 floats (~8.5 KB each in JSON,
    about 2.4x smaller gzipped, as real embeddings are), its usage at its end."""
    rng = random.Random(n)
    data = [{"object": "embedding", "index": i,
             "embedding": [round(rng.gauss(0, 0.05), 17) for _ in range(384)]}
            for i in range(n)]
    return {"object": "list", "data": data, "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def test_a_gzip_json_answer_past_the_bound_has_its_usage_read_from_its_decoded_end(
    storage: Storage,
) -> None:
    # Past max_json_body (1 MiB) a JSON answer's usage is read from its last bytes, but a
    # gzip one (GZipMiddleware inside the stack, or an upstream's gzip passed on) got none:
    # no ledger row, the limits charged the reservation. Its last decoded bytes are now kept
    # as it passes (never the whole body): held whole (700 KB of gzip, 1.7 MB decoded),
    # streamed past the bound while held (no length), or declared past it (a length).
    limiter = RateLimiter(Policy(requests="100/minute", tokens="100000/minute"), storage=storage)
    ledger = MemoryLedger()
    answer = embeddings_answer(200, 1234)
    raw = json.dumps(answer).encode()
    assert len(raw) > 1 << 20 and len(gzip.compress(raw)) < 1 << 20  # (held whole)
    big = json.dumps(embeddings_answer(300, 77)).encode()
    packed = gzip.compress(big, 1)
    assert len(packed) > 1 << 20  # (past the bound compressed too)

    async def embeddings(request: Request) -> Response:
        return JSONResponse(answer)

    async def streamed(request: Request) -> Response:  # gzipped as it goes, no length
        async def parts() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 64 << 10):
                yield big[i:i + (64 << 10)]

        return StreamingResponse(parts(), media_type="application/json")

    async def passed_on(scope: Any, receive: Any, send: Any) -> None:  # an upstream's gzip
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-encoding", b"gzip"),
            (b"content-length", str(len(packed)).encode())]})
        for i in range(0, len(packed), 100_000):
            await send({"type": "http.response.body", "body": packed[i:i + 100_000],
                        "more_body": i + 100_000 < len(packed)})

    app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]),
                            Route("/v1/streamed", streamed, methods=["POST"])])
    app.mount("/raw", passed_on)
    app.add_middleware(GZipMiddleware)  # (leaves the upstream's gzip as it is)
    install_stack(app, StackConfig(storage=storage, ratelimit=limiter,
                                   usage=UsageConfig(ledger=ledger, max_json_body=1 << 20)))
    body = {"model": "text-embedding-3-small", "input": ["hello world"] * 200,
            "max_tokens": 400}  # (a reservation to tell from the usage)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t",
                                 headers={"accept-encoding": "gzip"}) as c:
        for key, path, used in (("k1", "/v1/embeddings", 1234), ("k2", "/v1/streamed", 77),
                                ("k3", "/raw/", 77)):
            r = await c.post(path, json=body, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.headers["content-encoding"] == "gzip", path
            assert r.json()["usage"]["prompt_tokens"] == used  # (httpx decodes it)
            assert (await counters(limiter, key))["tokens:60"] == used, path
            if path == "/v1/embeddings":  # held whole before its head went out: headers too
                assert r.headers["x-usage-input-tokens"] == "1234"
    rows = [(await ledger.query(principal))[0] for principal, _ in ledger._requests]
    assert sorted(row.input_tokens for row in rows) == [77, 77, 1234]
    # the served model too, from the end of the decoded copy (an embeddings answer's)
    found = [await ledger.get_request(*key) for key in list(ledger._requests)]
    assert {row.record.model_version for row in found if row} == {"text-embedding-3-small"}


async def test_a_large_gzip_chat_answer_names_its_served_model_from_its_decoded_head() -> None:
    ledger = MemoryLedger()
    answer = {**COMPLETION, "model": "gpt-4o-mini-2024-07-18"}
    answer["choices"] = [{**COMPLETION["choices"][0], "message": {  # type: ignore[index]
        "role": "assistant", "content": "x" * (2 << 20)}}]  # (~1,000x smaller gzipped)

    async def chat(request: Request) -> Response:
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.add_middleware(GZipMiddleware)
    install_stack(app, StackConfig(usage=UsageConfig(ledger=ledger)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t",
                                 headers={"accept-encoding": "gzip"}) as c:
        r = await c.post("/v1/chat/completions", json=REQUEST)
    assert r.headers["content-encoding"] == "gzip" and r.headers["x-usage-total-tokens"] == "37"
    found = await ledger.get_request(*next(iter(ledger._requests)))
    assert found is not None and found.record.model_version == "gpt-4o-mini-2024-07-18"
    assert found.record.finish_reason is None  # (inside choices: not read, not guessed)


@pytest.mark.parametrize("parts", [1, 4])
async def test_a_body_read_to_its_end_is_decoded_to_a_bounded_size(parts: int) -> None:
    # Read for its last bytes, a gzip body is decoded to its end, but to at most 64x the
    # larger of max_json_body and its compressed size: a bomb (20 KiB of gzip decoding to
    # 20 MiB, its usage at its end) is given up on, a body within that read.
    def padded(size: int) -> bytes:
        usage = b'"usage": {"prompt_tokens": 5, "total_tokens": 5}'
        return gzip.compress(b'{"pad": "' + b" " * size + b'", ' + usage + b"}")

    bomb = padded(20 << 20)
    assert len(bomb) < 64 << 10
    messages, ledger = await sent_by(body_app(bomb, b"gzip", parts), max_json_body=256 << 10)
    assert b"".join(m.get("body", b"") for m in messages[1:]) == bomb
    assert len(ledger._requests) == 0  # given up at 16 MiB: no usage
    messages, ledger = await sent_by(body_app(padded(15 << 20), b"gzip", parts),
                                     max_json_body=256 << 10)
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert row.total_tokens == 5


def members(raw: bytes, count: int) -> bytes:
    """``raw`` gzipped as ``count`` members one after the other (RFC 1952 2.2), as
    ``cat a.gz b.gz`` makes, or a server that compresses each write on its own."""
    step = -(-len(raw) // count)
    return b"".join(gzip.compress(raw[i:i + step]) for i in range(0, len(raw), step))


@pytest.mark.parametrize("past", [False, True], ids=["within-the-bound", "past-the-bound"])
async def test_a_gzip_answer_of_several_members_has_its_usage_read(past: bool) -> None:
    # Decoding stopped at a gzip body's first member: past max_json_body its end (and usage)
    # was never reached, within it the first member alone was no JSON; no usage either way.
    ledger = MemoryLedger()
    raw = json.dumps(embeddings_answer(200 if past else 2, 1234)).encode()
    packed = members(raw, 3)
    assert (len(raw) > 1 << 20) is past and gzip.decompress(packed) == raw

    async def passed_on(scope: Any, receive: Any, send: Any) -> None:  # an upstream's gzip
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-encoding", b"gzip"),
            (b"content-length", str(len(packed)).encode())]})
        for i in range(0, len(packed), 100_000):
            await send({"type": "http.response.body", "body": packed[i:i + 100_000],
                        "more_body": i + 100_000 < len(packed)})

    app = Starlette()
    app.mount("/v1/embeddings", passed_on)
    install_stack(app, StackConfig(usage=UsageConfig(ledger=ledger, max_json_body=1 << 20)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t",
                                 headers={"accept-encoding": "gzip"}) as c, c.stream(
        "POST", "/v1/embeddings/", json={"model": "text-embedding-3-small", "input": "hi"}
    ) as r:
        sent = b"".join([part async for part in r.aiter_raw()])
    assert r.status_code == 200 and sent == packed  # (passed on as it came)
    if not past:  # held whole before its head went out: its headers say so too
        assert r.headers["x-usage-input-tokens"] == "1234"
    [found] = [await ledger.get_request(*key) for key in list(ledger._requests)]
    assert found is not None and found.record.usage.input_tokens == 1234
    assert found.record.model_version == "text-embedding-3-small"


@pytest.mark.parametrize("parts", [1, 4])
async def test_a_gzip_bomb_split_into_members_is_still_given_up_on(parts: int) -> None:
    # The bound on the work is the body's, not a member's: a bomb spread over members
    # (20 KiB decoding to 20 MiB, its usage in its last member) is read no further.
    def padded(size: int) -> bytes:
        usage = b'"usage": {"prompt_tokens": 5, "total_tokens": 5}'
        return (gzip.compress(b'{"pad": "') + gzip.compress(b" " * size)
                + gzip.compress(b'", ' + usage + b"}"))

    bomb = padded(20 << 20)
    assert len(bomb) < 64 << 10
    messages, ledger = await sent_by(body_app(bomb, b"gzip", parts), max_json_body=256 << 10)
    assert b"".join(m.get("body", b"") for m in messages[1:]) == bomb
    assert len(ledger._requests) == 0  # given up at 16 MiB: no usage
    messages, ledger = await sent_by(body_app(padded(15 << 20), b"gzip", parts),
                                     max_json_body=256 << 10)
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert row.total_tokens == 5


@pytest.mark.parametrize(("body", "read"), [
    (members(RAW, 2) + b"\0\0\0", True),  # zero bytes after the last member, as gzip(1)
    (members(RAW, 2) + b"not gzip", False),  # anything else after it: not whole
], ids=["zero-padded", "then-junk"])
async def test_what_follows_the_last_gzip_member(body: bytes, read: bool) -> None:
    messages, _ = await sent_by(body_app(body, b"gzip", 3))
    assert (b"x-usage-total-tokens" in dict(messages[0]["headers"])) is read
    assert b"".join(m.get("body", b"") for m in messages[1:]) == body


async def test_a_gzip_event_stream_of_one_member_per_event_is_read_to_its_end() -> None:
    # A server that compresses each event as its own gzip member: the usage comes last.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")]})
        for line in sse_lines(STREAM_EVENTS):
            await send({"type": "http.response.body", "body": gzip.compress(line),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    messages, ledger = await sent_by(app)
    sent = b"".join(m.get("body", b"") for m in messages[1:])
    assert gzip.decompress(sent) == b"".join(sse_lines(STREAM_EVENTS))
    [row] = await ledger.query(next(iter(ledger._requests))[0])
    assert (row.input_tokens, row.output_tokens, row.finish_reasons) == (12, 3, {"stop": 1})
