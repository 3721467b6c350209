"""Real uvicorn + real clients: the OpenAI and Anthropic SDKs, and Last-Event-ID resume."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import anyio
import anyio.lowlevel
import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from httpx_sse import aconnect_sse

from aimiddleware import (
    AnthropicDialect,
    CancellationConfig,
    EventStreamResponse,
    IdempotencyConfig,
    OpenAIChatDialect,
    ReplayBuffer,
    ServerSentEvent,
    StreamResult,
    UpstreamUnavailable,
    Usage,
    current,
    install,
)
from aimiddleware.context import NO_MODEL_CALL
from aimiddleware.storage import Storage
from aimiddleware.usage import MemoryLedger, UsageConfig
from tests.live_server import serve


def chat_app(record: dict[str, Any]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> EventStreamResponse:
        body = current().json()
        record["ctx"] = current()

        async def tokens() -> AsyncIterator[Any]:
            for word in ["Hello", ",", " world"]:
                yield word
                await anyio.lowlevel.checkpoint()
            if body["model"] == "broken":
                raise UpstreamUnavailable()
            yield StreamResult(usage=Usage(input_tokens=9, output_tokens=3), finish_reason="stop")

        return EventStreamResponse(tokens(), dialect=OpenAIChatDialect.for_request(body))

    @app.post("/v1/messages")
    async def messages(request: Request) -> EventStreamResponse:
        body = current().json()

        async def tokens() -> AsyncIterator[Any]:
            yield "Hi"
            yield " there"
            if body["model"] == "broken":
                raise UpstreamUnavailable()
            usage = Usage(input_tokens=7, output_tokens=2)
            yield StreamResult(usage=usage, finish_reason="end_turn")

        dialect = AnthropicDialect(body["model"], input_tokens=7)
        return EventStreamResponse(tokens(), dialect=dialect)

    return install(app)  # type: ignore[no-any-return]


async def test_openai_sdk_streams_gets_usage_and_raises_on_error() -> None:
    record: dict[str, Any] = {}
    async with serve(chat_app(record)) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello, world"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 3)
        assert all(c.model == "gpt-test" for c in chunks)
        assert record["ctx"].usage == Usage(input_tokens=9, output_tokens=3)

        stream = await client.chat.completions.create(
            model="broken", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got: list[str] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        assert "".join(got) == "Hello, world"  # the deltas before the error arrived
        assert info.value.code == "upstream_unavailable"
        assert record["ctx"].raw_finish_reason == "error"
        await client.close()


async def test_anthropic_sdk_streams_gets_usage_and_raises_on_error() -> None:
    async with serve(chat_app({})) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0)
        async with client.messages.stream(
            model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "Hi there"
        assert final.stop_reason == "end_turn"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 2)

        with pytest.raises(anthropic.APIStatusError):
            async with client.messages.stream(
                model="broken", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                async for _ in stream.text_stream:
                    pass
        await client.close()


def resumable_app(
    buffer: ReplayBuffer,
    total: int,
    contexts: list[Any] | None = None,
    dialect: Any = None,
    ledger: MemoryLedger | None = None,
    own_ids: bool = False,
) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/stream")
    async def stream() -> EventStreamResponse:
        if contexts is not None:
            contexts.append(current())

        async def tokens() -> AsyncIterator[Any]:
            for i in range(total):
                yield ServerSentEvent(f"tok{i}", "tok", id=f"mine-{i}") if own_ids else f"tok{i}"
                await anyio.sleep(0.01)
            yield StreamResult(usage=Usage(input_tokens=5, output_tokens=total))

        return EventStreamResponse(tokens(), replay=buffer, heartbeat=None, dialect=dialect)

    return install(app, usage=UsageConfig(ledger=ledger))  # type: ignore[no-any-return]


async def read_events(
    client: httpx.AsyncClient, headers: dict[str, str], stop_after: int | None = None
) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    async with aconnect_sse(client, "POST", "/v1/stream", json={}, headers=headers) as source:
        async for sse in source.aiter_sse():
            out.append((sse.id, sse.event, sse.data))
            if stop_after is not None and len(out) == stop_after:
                break  # drop the connection mid-stream
    return out


async def test_last_event_id_resume_delivers_every_event_exactly_once(storage: Storage) -> None:
    total = 30
    buffer = ReplayBuffer(storage, max_events=100, ttl=30)
    auth = {"authorization": "Bearer key-1"}
    contexts: list[Any] = []
    async with serve(resumable_app(buffer, total, contexts)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            first = await read_events(client, auth, stop_after=8)
        await anyio.sleep(0.05)  # the producer keeps going while nobody is connected
        async with httpx.AsyncClient(base_url=url) as client:
            second = await read_events(client, {**auth, "last-event-id": first[-1][0]})
            # another tenant cannot resume this stream
            other = await client.post(
                "/v1/stream", json={}, headers={"authorization": "Bearer key-2",
                                                "last-event-id": first[-1][0]}
            )
            assert other.status_code == 404
            # reconnecting after the end is answered 204: an EventSource stops retrying
            done = await client.post(
                "/v1/stream", json={}, headers={**auth, "last-event-id": second[-1][0]}
            )
            assert done.status_code == 204
    events = first + second
    ids = [e[0] for e in events]
    assert len(ids) == len(set(ids))  # no repeats
    seqs = [int(i.rsplit(":", 1)[1]) for i in ids]
    assert seqs == list(range(1, len(seqs) + 1))  # no gaps
    deltas = [json.loads(d)["text"] for _, kind, d in events if kind == "delta"]
    assert deltas == [f"tok{i}" for i in range(total)]
    assert [kind for _, kind, _ in events][-2:] == ["usage", "done"]
    assert len({i.rsplit(":", 1)[0] for i in ids}) == 1  # one stream id throughout
    # The model ran once: its usage is the first request's; the resume replayed it and
    # used nothing (it was counted, and charged by a limiter, a second time).
    # The same for the 404 (another tenant) and the 204 after the end.
    usage = [c.usage and (c.usage.input_tokens, c.usage.output_tokens) for c in contexts]
    assert usage == [(5, total), None, None, None]
    assert [NO_MODEL_CALL in c.state for c in contexts] == [False, True, True, True]


async def test_a_resume_past_the_newest_event_is_a_404(storage: Storage) -> None:
    """A Last-Event-ID whose number is past the newest event of a running stream (only a
    hand-edited or corrupted one: the stream's random part matched) waited for an event
    after it, showing none of those before, until the stream ended (an empty 200) or
    ``resume_idle_timeout`` passed. It is an id the stream never sent: a 404, as an unknown
    one, while the stream runs and after its end; the newest event's id still follows."""
    buffer = ReplayBuffer(storage, max_events=100, ttl=30)
    release = anyio.Event()
    app = FastAPI()

    @app.post("/v1/stream")
    async def stream() -> EventStreamResponse:
        async def tokens() -> AsyncIterator[Any]:
            for i in range(3):
                yield f"tok{i}"
            await release.wait()  # the stream keeps running until the test lets it end
            yield "tok3"
            yield StreamResult(usage=Usage(input_tokens=5, output_tokens=4))

        return EventStreamResponse(tokens(), replay=buffer, heartbeat=None,
                                   resume_idle_timeout=1.0)

    auth = {"authorization": "Bearer key-1"}
    async with serve(install(app)) as url, httpx.AsyncClient(base_url=url) as client:
        first = await read_events(client, auth, stop_after=3)
        sid, seq = first[-1][0].rsplit(":", 1)
        for ahead in (f"{sid}:{int(seq) + 1}", f"{sid}:{int(seq) + 50}"):
            with anyio.fail_after(5):
                async with aconnect_sse(client, "POST", "/v1/stream", json={},
                                        headers={**auth, "last-event-id": ahead}) as source:
                    assert source.response.status_code == 404
                    body = json.loads(await source.response.aread())
            assert body["error"]["code"] == "not_found"
        release.set()  # the newest event's own id follows the live stream to its end
        rest = await read_events(client, {**auth, "last-event-id": first[-1][0]})
        assert [json.loads(d)["text"] for _, e, d in rest if e == "delta"] == ["tok3"]
        assert [e for _, e, _ in rest][-2:] == ["usage", "done"]
        ended = await client.post("/v1/stream", json={},
                                  headers={**auth, "last-event-id": rest[-1][0]})
        assert ended.status_code == 204
        past = await client.post("/v1/stream", json={},
                                 headers={**auth, "last-event-id": f"{sid}:{int(seq) + 50}"})
        assert past.status_code == 404


async def test_send_timeout_abandons_a_client_that_stopped_reading() -> None:
    record: dict[str, Any] = {}
    app = FastAPI()

    @app.get("/v1/flood")
    async def flood() -> EventStreamResponse:
        record["ctx"] = current()

        async def events() -> AsyncIterator[str]:
            try:
                chunk = "x" * 65536
                for i in range(10_000):  # far more than the socket buffers hold
                    record["sent"] = i
                    yield chunk
            finally:
                record["closed_at"] = anyio.current_time()

        return EventStreamResponse(events(), send_timeout=0.3, heartbeat=None)

    async with serve(install(app)) as url:
        host, port = url.removeprefix("http://").split(":")
        stream = await anyio.connect_tcp(host, int(port))
        await stream.send(b"GET /v1/flood HTTP/1.1\r\nhost: x\r\n\r\n")
        # never read: the server's writes fill the buffers and its send blocks
        for _ in range(300):
            if "closed_at" in record:
                break
            await anyio.sleep(0.02)
        await stream.aclose()
    assert "closed_at" in record, "the stream was never abandoned"
    assert record["sent"] < 9_999
    assert record["ctx"].raw_finish_reason == "cancelled"


async def test_a_stream_cut_by_its_timeout_tier_is_recorded_as_a_timeout() -> None:
    # It was recorded as "cancelled", like a client that left: the usage history could not
    # tell a server timeout from a disconnect.
    contexts: list[Any] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> EventStreamResponse:
        contexts.append(current())

        async def tokens() -> AsyncIterator[str]:
            for i in range(1000):
                yield f"tok{i} "
                await anyio.sleep(0.01)

        return EventStreamResponse(tokens(), dialect=OpenAIChatDialect("m"))

    ledger = MemoryLedger()
    install(app, cancellation=CancellationConfig(timeouts={"/v1/chat/completions": 0.3}),
            usage=UsageConfig(ledger=ledger))
    async with (
        serve(app) as url,
        httpx.AsyncClient(base_url=url) as client,
        aconnect_sse(client, "POST", "/v1/chat/completions", json={}) as source,
    ):
        data = [sse.data async for sse in source.aiter_sse()]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "timeout"
    assert contexts[0].raw_finish_reason == "timeout"
    # The usage history too (recorded when the stream was cut, before its error event).
    await ledger.flush()
    found = await ledger.get_request(contexts[0].principal, contexts[0].request_id)
    assert found is not None and found.record.raw_finish_reason == "timeout"


async def test_events_with_ids_of_their_own_still_resume() -> None:
    """A resumable stream numbers its events: an item's own id would have replaced the
    number, and a resume from it found no such event (a fresh run of the model)."""
    buffer = ReplayBuffer(Storage("memory://"), max_events=100, ttl=30)
    auth = {"authorization": "Bearer key-1"}
    contexts: list[Any] = []
    async with serve(resumable_app(buffer, 10, contexts, own_ids=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        first = await read_events(client, auth, stop_after=4)
        rest = await read_events(client, {**auth, "last-event-id": first[-1][0]})
    assert [data for _, _, data in first + rest][:10] == [f"tok{i}" for i in range(10)]
    assert [int(i.rsplit(":", 1)[1]) for i, _, _ in first + rest] == list(range(1, 13))
    assert [NO_MODEL_CALL in c.state for c in contexts] == [False, True]


async def test_a_resume_has_no_row_in_the_usage_history() -> None:
    # A resume calls no model, yet the usage layer found the replayed chunks' finish reason
    # (or the cut's) and recorded a 0-token row for it.
    buffer, ledger, contexts = ReplayBuffer("memory://", ttl=30), MemoryLedger(), []
    app = resumable_app(buffer, 20, contexts, dialect=OpenAIChatDialect("m"), ledger=ledger)
    auth = {"authorization": "Bearer key-1"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        first = await read_events(client, auth, stop_after=3)
        await anyio.sleep(0.3)  # (the producer finishes meanwhile)
        await read_events(client, {**auth, "last-event-id": first[-1][0]})
        await read_events(client, {**auth, "last-event-id": first[-1][0]}, stop_after=2)
    await anyio.sleep(0.1)
    rows = [await ledger.get_request(c.principal, c.request_id) for c in contexts]
    assert rows[0] is not None and rows[0].record.usage.output_tokens == 20
    assert rows[1:] == [None, None]


async def test_a_resume_of_a_stream_evicted_by_max_bytes_is_a_404() -> None:
    """In memory the buffer keeps at most ``max_bytes``: newer streams push the least
    recently used out whole, and a resume of one pushed out is a 404 (not a stream with a
    gap), while the newest still resume."""
    buffer = ReplayBuffer("memory://", ttl=30, max_bytes=12_000)
    auth = {"authorization": "Bearer key-1"}
    async with serve(resumable_app(buffer, 10)) as url, httpx.AsyncClient(base_url=url) as client:
        first = await read_events(client, auth)
        assert len(first) == 12
        assert await read_events(client, {**auth, "last-event-id": first[2][0]}) == first[3:]
        for _ in range(4):
            last = await read_events(client, auth)
        assert 1 < len(buffer._mem) < 5 and buffer._mem.bytes <= 12_000
        gone = await client.post("/v1/stream", json={},
                                 headers={**auth, "last-event-id": first[2][0]})
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "not_found"
        assert await read_events(client, {**auth, "last-event-id": last[2][0]}) == last[3:]


async def test_send_timeout_keeps_a_resumable_producer_running() -> None:
    # A client that stops reading (a network drop: no FIN) was abandoned by cancelling the
    # whole response, the producer with it: the replay never got its end, and a reconnect
    # with Last-Event-ID waited for events that never came, then got a timeout error. With
    # replay=, the producer runs to its end, as it does when the client closes.
    record: dict[str, Any] = {}
    buffer = ReplayBuffer("memory://", ttl=30)
    total = 400
    app = FastAPI()

    @app.get("/v1/flood")
    async def flood() -> EventStreamResponse:
        async def events() -> AsyncIterator[Any]:
            chunk = "x" * 65536
            for i in range(total):  # far more than the socket buffers hold
                record["sent"] = i
                yield chunk
            yield StreamResult(usage=Usage(input_tokens=1, output_tokens=total))
            record["finished"] = True

        return EventStreamResponse(
            events(), send_timeout=0.3, heartbeat=None, replay=buffer, stream_id="flood",
            resume_idle_timeout=1.0,
        )

    async with serve(install(app)) as url:
        host, port = url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stalled:
            await stalled.send(b"GET /v1/flood HTTP/1.1\r\nhost: x\r\n\r\n")
            # never read: the server's writes fill the buffers and its send blocks
            for _ in range(500):
                if "finished" in record:
                    break
                await anyio.sleep(0.02)
            assert record.get("finished"), f"the producer stopped at event {record.get('sent')}"
            async with (
                httpx.AsyncClient(base_url=url) as client,
                aconnect_sse(client, "GET", "/v1/flood",
                             headers={"last-event-id": f"flood:{total - 2}"}) as source,
            ):
                events = [(sse.id, sse.event) async for sse in source.aiter_sse()]
    assert events == [
        (f"flood:{total - 1}", "delta"), (f"flood:{total}", "delta"),
        (f"flood:{total + 1}", "usage"), (f"flood:{total + 2}", "done"),
    ]


async def test_a_last_event_id_with_non_ascii_digits_starts_a_fresh_stream() -> None:
    # "s:²" passed the id's digit check (str.isdigit) and then failed int(): a 500 for an
    # id this package never writes, which is a fresh request like any other foreign id.
    buffer = ReplayBuffer("memory://", ttl=30)
    async with serve(resumable_app(buffer, 3)) as url, httpx.AsyncClient(base_url=url) as client:
        for odd in ("s:\u00b2", "s:\u2460"):
            response = await client.post(
                "/v1/stream", json={}, headers={"last-event-id": odd.encode()}
            )
            assert response.status_code == 200
            assert response.text.endswith("event: done\ndata: [DONE]\n\n")


async def test_split_and_lone_surrogates_in_deltas_reach_the_openai_sdk() -> None:
    # Some OpenAI-compatible upstreams send an emoji's two UTF-16 halves in two deltas
    # ("\ud83d", then "\ude00"), or a lone one; a proxy's json.loads keeps them as lone
    # surrogates, which UTF-8 cannot encode: the first one ended the stream with an
    # internal error event. JSON can carry them escaped (\ud83d), as the upstream did.
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> EventStreamResponse:
        body = current().json()

        async def tokens() -> AsyncIterator[Any]:
            for delta in ("Hi ", "\ud83d", "\ude00", " and \udcaf"):
                yield delta
            yield StreamResult(usage=Usage(input_tokens=2, output_tokens=4), finish_reason="stop")

        return EventStreamResponse(tokens(), dialect=OpenAIChatDialect.for_request(body))

    async with serve(install(app)) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hi \ud83d\ude00 and \udcaf"  # every half, as sent
    assert text.encode("utf-16", "surrogatepass").decode("utf-16", "replace") == "Hi 😀 and \ufffd"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_resumable_stream_its_client_left_is_not_stored_with_a_hole() -> None:
    # With replay=, the producer runs on after the client leaves, but the frames made
    # meanwhile go to the replay buffer only, not down the send chain; its end still went
    # out, so the idempotency layer stored the frames seen before the drop, then the end:
    # a retry with the same Idempotency-Key was replayed an answer with a hole in it that
    # ended as if whole. It must get the whole answer, or run again.
    total = 30
    produced: list[str] = []
    buffer = ReplayBuffer("memory://", ttl=30)
    app = FastAPI()

    @app.post("/v1/stream")
    async def stream() -> EventStreamResponse:
        async def tokens() -> AsyncIterator[Any]:
            try:
                for i in range(total):
                    yield f"tok{i}"
                    await anyio.sleep(0.01)
                yield StreamResult(usage=Usage(input_tokens=5, output_tokens=total))
            finally:
                produced.append("end")

        return EventStreamResponse(tokens(), replay=buffer, heartbeat=None)

    install(app, idempotency=IdempotencyConfig())
    headers = {"authorization": "Bearer key-1", "idempotency-key": "once-1"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        first = await read_events(client, headers, stop_after=3)
        for _ in range(250):  # the producer runs to its end meanwhile
            if produced:
                break
            await anyio.sleep(0.02)
        await anyio.sleep(0.1)  # (its end frames, after the iterator)
        retry = await read_events(client, headers)
    assert len(first) == 3 and produced == ["end"]
    deltas = [json.loads(d)["text"] for _, kind, d in retry if kind == "delta"]
    assert deltas == [f"tok{i}" for i in range(total)]
    assert [kind for _, kind, _ in retry][-2:] == ["usage", "done"]


def keyed_resumable_app(total: int, delay: float, follow: bool) -> FastAPI:
    app = FastAPI()
    buffer = ReplayBuffer("memory://", ttl=30)

    @app.post("/v1/stream")
    async def stream() -> EventStreamResponse:
        async def tokens() -> AsyncIterator[Any]:
            for i in range(total):
                yield f"tok{i}"
                await anyio.sleep(delay)
            yield StreamResult(usage=Usage(input_tokens=5, output_tokens=total))

        return EventStreamResponse(tokens(), replay=buffer, heartbeat=None)

    install(app, idempotency=IdempotencyConfig(follow_streams=follow))
    return app


@pytest.mark.parametrize("follow", [False, True], ids=["stored", "still-going-out"])
async def test_a_keyed_reconnect_with_last_event_id_gets_only_the_events_it_missed(
    follow: bool,
) -> None:
    """A reconnecting SSE client sends the request again, Idempotency-Key included, with
    Last-Event-ID: the idempotency layer answers it, and sent the stream from its start, so
    the client appended every event it had a second time."""
    total = 30
    headers = {"authorization": "Bearer key-1", "idempotency-key": "resume-1"}
    app = keyed_resumable_app(total, 0.02 if follow else 0.0, follow)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        first = await read_events(client, headers, stop_after=5)
        if not follow:
            await anyio.sleep(0.5)  # the producer ends and the answer is stored
        rest = await read_events(client, {**headers, "last-event-id": first[-1][0]})
        events = first + rest
        assert [int(i.rsplit(":", 1)[1]) for i, _, _ in events] == list(
            range(1, len(events) + 1)
        )
        deltas = [json.loads(d)["text"] for _, kind, d in events if kind == "delta"]
        assert deltas == [f"tok{i}" for i in range(total)]
        assert [kind for _, kind, _ in events][-2:] == ["usage", "done"]
        # After the end: nothing more, and a 204 stops an EventSource reconnecting
        done = await client.post("/v1/stream", json={},
                                 headers={**headers, "last-event-id": events[-1][0]})
        assert done.status_code == 204 and done.headers["idempotent-replayed"] == "true"
        # An id this stream never carried: the whole stream, as before
        whole = await read_events(client, {**headers, "last-event-id": "other:3"})
        assert whole == events
