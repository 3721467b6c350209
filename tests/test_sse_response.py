"""EventStreamResponse at the ASGI level: raw ``send`` messages are recorded one by one."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.routing import Route

from aimiddleware import RequestContextMiddleware, Usage
from aimiddleware.context import current
from aimiddleware.errors import UpstreamUnavailable
from aimiddleware.sse import (
    AnthropicDialect,
    EventStreamResponse,
    OpenAIChatDialect,
    ServerSentEvent,
    StreamResult,
    StreamSummary,
)
from tests.sse_spec import parse
from tests.stalls import steady


class Recorder:
    """Drives one ASGI request and keeps every message sent, with its arrival time."""

    def __init__(self, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None):
        self.messages: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.disconnect = anyio.Event()
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": "/",
            "raw_path": b"/", "root_path": "", "query_string": b"",
            "headers": [(b"host", b"t"), *(headers or [])], "client": ("127.0.0.1", 1),
            "server": ("t", 80), "state": {},
        }
        self._body_sent = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.times.append(time.monotonic())

    async def run(self, app: Any) -> None:
        await app(self.scope, self.receive, self.send)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages[1:] if m["type"] == "http.response.body"]

    @property
    def raw(self) -> bytes:
        return b"".join(self.bodies)


def endpoint_app(make: Any) -> Starlette:
    async def handler(request: Request) -> EventStreamResponse:
        return make()  # type: ignore[no-any-return]

    return Starlette(routes=[Route("/", handler, methods=["GET", "HEAD"])])


async def test_headers_first_then_events_usage_and_done() -> None:
    async def gen() -> AsyncIterator[Any]:
        yield "hel"
        yield ServerSentEvent(data="raw", event="note")
        yield {"data": {"k": 1}, "event": "obj"}
        yield StreamResult(usage=Usage(input_tokens=3, output_tokens=2), finish_reason="length")

    rec = Recorder()
    app = RequestContextMiddleware(endpoint_app(lambda: EventStreamResponse(gen(), model="m1")))
    await rec.run(app)
    start = rec.messages[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    h = rec.headers
    assert h[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert h[b"cache-control"] == b"no-store"
    assert h[b"x-accel-buffering"] == b"no"
    assert b"content-length" not in h
    events = parse(rec.raw).events
    assert [e.type for e in events] == ["delta", "note", "obj", "usage", "done"]
    assert json.loads(events[0].data) == {"text": "hel"}
    usage = json.loads(events[3].data)
    assert usage["usage"]["total_tokens"] == 5
    assert usage["finish_reason"] == "length"
    assert usage["model"] == "m1"
    assert usage["request_id"] == h[b"x-request-id"].decode()
    assert usage["request_duration_ms"] > 0
    assert events[4].data == "[DONE]"
    assert rec.messages[-1]["more_body"] is False
    # each event is its own body message: nothing is joined or held back
    assert len(rec.bodies) == 4


async def test_context_gets_usage_and_streaming_flag() -> None:
    seen: dict[str, Any] = {}

    async def gen() -> AsyncIterator[Any]:
        yield "a"
        yield Usage(input_tokens=1, output_tokens=1)
        yield "b"
        yield Usage(input_tokens=1, output_tokens=2)

    async def handler(request: Request) -> EventStreamResponse:
        seen["ctx"] = current()
        return EventStreamResponse(gen())

    app = RequestContextMiddleware(Starlette(routes=[Route("/", handler)]))
    await Recorder().run(app)
    ctx = seen["ctx"]
    assert ctx.streaming is True
    assert ctx.usage == Usage(input_tokens=1, output_tokens=2)
    assert ctx.raw_finish_reason == "stop"
    assert ctx.stream_error_writer is not None
    assert ctx.state["sse.completed"] is True


async def test_sync_iterator_and_head() -> None:
    def gen() -> Iterator[str]:
        yield "x"
        yield "y"

    rec = Recorder()
    await rec.run(endpoint_app(lambda: EventStreamResponse(gen())))
    assert [e.type for e in parse(rec.raw).events] == ["delta", "delta", "usage", "done"]

    head = Recorder(method="HEAD")
    await head.run(endpoint_app(lambda: EventStreamResponse(gen())))
    assert head.messages[0]["status"] == 200
    assert head.raw == b""


async def test_heartbeats_during_silence_and_none_while_events_flow() -> None:
    interval = 0.15

    async def gen() -> AsyncIterator[str]:
        for i in range(60):  # an event every ~2 ms: a heartbeat is never due
            yield f"fast{i}"
            await anyio.sleep(0.002)
        await anyio.sleep(interval * 5.5)  # a silence of several intervals
        yield "after"

    async def scenario() -> None:
        # Counts and gaps hold on a machine that runs the loop on time; an attempt during
        # which it stalled (even briefly: the gaps allow 15 ms) is run again (tests.stalls).
        rec = Recorder()
        await rec.run(endpoint_app(lambda: EventStreamResponse(gen(), heartbeat=interval)))
        bodies = rec.bodies
        beats = [i for i, b in enumerate(bodies) if b == b": ping\n\n"]
        assert all(i >= 60 for i in beats), "a heartbeat was sent while events flowed"
        assert 3 <= len(beats) <= 6, f"expected ~5 heartbeats in the silence, got {len(beats)}"
        silence = [rec.times[i + 1] for i in beats]  # +1: messages[0] is the start
        gaps = [b - a for a, b in itertools.pairwise(silence)]
        assert all(g >= interval * 0.9 for g in gaps)  # one per interval of silence, not more
        assert [e.data for e in parse(rec.raw).events][60] == '{"text":"after"}'

    await steady(scenario, stall=0.01)


async def test_gzip_middleware_passes_events_one_by_one() -> None:
    async def gen() -> AsyncIterator[str]:
        for i in range(5):
            yield "x" * 300 + str(i)  # compressible and above GZip's minimum size
            await anyio.sleep(0.01)

    app = GZipMiddleware(endpoint_app(lambda: EventStreamResponse(gen())), minimum_size=10)
    rec = Recorder(headers=[(b"accept-encoding", b"gzip")])
    await rec.run(app)
    assert b"content-encoding" not in rec.headers
    bodies = rec.bodies
    assert len(bodies) == 6  # five events, then usage + done
    for i, body in enumerate(bodies[:5]):
        assert parse(body).events[0].data.endswith(f'{i}"}}')
    gaps = [b - a for a, b in zip(rec.times[1:5], rec.times[2:6], strict=False)]
    assert min(gaps) > 0.005  # sent as produced, not at the end


async def test_iterator_error_becomes_error_event_in_each_dialect() -> None:
    async def gen() -> AsyncIterator[str]:
        yield "partial"
        raise UpstreamUnavailable()

    rec = Recorder()
    app = RequestContextMiddleware(endpoint_app(lambda: EventStreamResponse(gen())))
    await rec.run(app)
    events = parse(rec.raw).events
    assert [e.type for e in events] == ["delta", "usage", "error", "done"]
    body = json.loads(events[2].data)
    assert body["error"]["code"] == "upstream_unavailable"
    assert body["status"] == 503 and body["retryable"] is True
    assert body["request_id"] == rec.headers[b"x-request-id"].decode()

    rec = Recorder()
    await rec.run(endpoint_app(lambda: EventStreamResponse(gen(), dialect=AnthropicDialect())))
    events = parse(rec.raw).events
    assert events[-1].type == "error"
    assert json.loads(events[-1].data)["error"]["type"] == "overloaded_error"

    rec = Recorder()
    await rec.run(endpoint_app(lambda: EventStreamResponse(gen(), dialect=OpenAIChatDialect())))
    events = parse(rec.raw).events
    assert events[-1].data == "[DONE]"
    assert json.loads(events[-2].data)["error"]["code"] == "upstream_unavailable"


async def test_unexpected_exception_leaks_nothing() -> None:
    async def gen() -> AsyncIterator[str]:
        yield "a"
        raise RuntimeError("secret prompt text")

    rec = Recorder()
    await rec.run(endpoint_app(lambda: EventStreamResponse(gen())))
    assert b"secret" not in rec.raw
    assert json.loads(parse(rec.raw).events[-2].data)["error"]["code"] == "internal"


async def test_client_disconnect_cancels_the_iterator() -> None:
    state: dict[str, Any] = {}
    rec = Recorder()

    async def gen() -> AsyncIterator[str]:
        try:
            yield "one"
            rec.disconnect.set()
            await anyio.sleep(10)
            yield "never"
        finally:
            state["closed"] = True

    with anyio.fail_after(2):
        await rec.run(endpoint_app(lambda: EventStreamResponse(gen())))
    assert state["closed"]
    assert b"never" not in rec.raw


@pytest.mark.parametrize(
    "kwargs", [{"heartbeat": 0}, {"send_timeout": -1}, {"stream_id": "a:b"}]
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EventStreamResponse(iter(()), **kwargs)
    with pytest.raises(TypeError):
        EventStreamResponse("not an iterator of events")


async def test_send_oserror_means_the_client_left() -> None:
    state: dict[str, Any] = {}

    class Closing(Recorder):
        async def send(self, message: dict[str, Any]) -> None:
            if len(self.messages) >= 3:
                raise OSError("connection closed")  # what ASGI >= 2.4 servers do
            await super().send(message)

    async def gen() -> AsyncIterator[str]:
        try:
            for i in range(100):
                yield f"t{i}"
        finally:
            state["closed"] = True

    rec = Closing()
    app = RequestContextMiddleware(endpoint_app(lambda: EventStreamResponse(gen())))
    await rec.run(app)
    assert state["closed"] and len(rec.messages) == 3


async def test_the_source_is_closed_when_the_head_cannot_be_sent() -> None:
    # The client left before the head went out: the source was never closed (a source
    # holding a resource opened before the stream, an upstream response, kept it).
    closed: list[bool] = []

    class Source:
        def __aiter__(self) -> Source:
            return self

        async def __anext__(self) -> str:
            return "never"

        async def aclose(self) -> None:
            closed.append(True)

    class Gone(Recorder):
        async def send(self, message: dict[str, Any]) -> None:
            raise OSError("connection closed")

    with pytest.raises(OSError):
        await Gone().run(endpoint_app(lambda: EventStreamResponse(Source())))
    assert closed == [True]


async def test_pass_through_provider_events_report_usage() -> None:
    seen: dict[str, Any] = {}
    openai_chunks = [
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-x",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-x",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-x", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                   "prompt_tokens_details": {"cached_tokens": 2}}},
    ]

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        for c in openai_chunks:
            yield c

    async def handler(request: Request) -> EventStreamResponse:
        seen["ctx"] = current()
        return EventStreamResponse(chunks(), dialect=OpenAIChatDialect("gpt-x"))

    rec = Recorder()
    await rec.run(RequestContextMiddleware(Starlette(routes=[Route("/", handler)])))
    events = parse(rec.raw).events
    assert [json.loads(e.data) for e in events[:3]] == openai_chunks  # passed through as is
    assert events[-1].data == "[DONE]" and len(events) == 4  # no extra finish chunk
    ctx = seen["ctx"]
    assert ctx.usage == Usage(input_tokens=5, output_tokens=7, cached_input_tokens=2)
    assert ctx.raw_finish_reason == "length"

    # Asked for usage: the chunk passed through is the only one (end() adds none of its own)
    async def with_usage(request: Request) -> EventStreamResponse:
        dialect = OpenAIChatDialect("gpt-x", include_usage=True)
        return EventStreamResponse(chunks(), dialect=dialect)

    rec = Recorder()
    await rec.run(RequestContextMiddleware(Starlette(routes=[Route("/", with_usage)])))
    data = [e.data for e in parse(rec.raw).events]
    assert [json.loads(d) for d in data[:3]] == openai_chunks and data[3:] == ["[DONE]"]

    anthropic_events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 4, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]

    async def events_() -> AsyncIterator[dict[str, Any]]:
        for e in anthropic_events:
            yield e

    async def handler2(request: Request) -> EventStreamResponse:
        seen["ctx"] = current()
        return EventStreamResponse(events_(), dialect=AnthropicDialect())

    rec = Recorder()
    await rec.run(RequestContextMiddleware(Starlette(routes=[Route("/", handler2)])))
    parsed = parse(rec.raw).events
    assert [e.type for e in parsed] == [e["type"] for e in anthropic_events]
    assert seen["ctx"].usage == Usage(input_tokens=4, output_tokens=9)
    assert seen["ctx"].raw_finish_reason == "max_tokens"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.builds(
            ServerSentEvent,
            data=st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
            event=st.none() | st.text(st.characters(exclude_categories=("Cs",),
                                                    exclude_characters="\r\n"), max_size=10),
            id=st.none() | st.text(st.characters(exclude_categories=("Cs",),
                                                 exclude_characters="\r\n\x00"), max_size=10),
        ),
        max_size=8,
    )
)
def test_events_through_the_response_parse_back(events: list[ServerSentEvent]) -> None:
    async def gen() -> AsyncIterator[ServerSentEvent]:
        for ev in events:
            yield ev

    rec = Recorder()
    anyio.run(rec.run, endpoint_app(lambda: EventStreamResponse(gen(), heartbeat=None)))
    got = parse(rec.raw).events[: len(events)]
    want = [(e.event or "message", e.data.replace("\r\n", "\n").replace("\r", "\n"))
            for e in events]
    assert [(g.type, g.data) for g in got] == want
    assert [e.type for e in parse(rec.raw).events[len(events):]] == ["usage", "done"]


async def test_headers_go_out_before_a_slow_first_event_and_cost_is_priced() -> None:
    from decimal import Decimal

    def pricer(model: str | None, usage: Usage) -> Decimal:
        assert model == "m"
        return Decimal("0.000002") * usage.total_tokens

    async def scenario() -> Recorder:
        rec = Recorder()

        async def gen() -> AsyncIterator[Any]:
            # A slow model: no first token until the client has the headers (were they held
            # back for the first event, this would never end: fail_after below).
            while not rec.messages:  # noqa: ASYNC110 - the recorder's send sets no event
                await anyio.sleep(0.01)
            await anyio.sleep(0.1)
            yield "late"
            yield Usage(input_tokens=1000, output_tokens=500)

        t0 = time.monotonic()
        with anyio.fail_after(5):
            await rec.run(endpoint_app(lambda: EventStreamResponse(gen(), model="m",
                                                                   pricer=pricer)))
        assert rec.messages[0]["type"] == "http.response.start"
        assert rec.times[0] - t0 < 0.25  # at once (an attempt the machine stalled is rerun)
        assert rec.times[1] - rec.times[0] >= 0.1  # the start did not wait for the event
        return rec

    rec = await steady(scenario)
    usage = json.loads(parse(rec.raw).events[1].data)
    assert usage["estimated_cost"] == "0.003000"


def test_for_request_includes_usage_only_when_asked_with_true() -> None:
    # A truthy non-boolean ("yes") turned the dialect's usage chunk on while the model
    # source, reading `is True`, sent none: the stream ended in a chunk of another id.
    for options, expected in (({"include_usage": True}, True), ({"include_usage": "yes"}, False),
                              ({"include_usage": 1}, False), ({}, False), ("junk", False)):
        body = {"model": "m", "stream_options": options}
        assert OpenAIChatDialect.for_request(body).include_usage is expected, options


@pytest.mark.parametrize(
    ("finish", "sequence", "delta"),
    [
        ("stop", "###", {"stop_reason": "stop_sequence", "stop_sequence": "###"}),
        (None, "###", {"stop_reason": "stop_sequence", "stop_sequence": "###"}),
        ("stop_sequence", "###", {"stop_reason": "stop_sequence", "stop_sequence": "###"}),
        ("length", "###", {"stop_reason": "max_tokens", "stop_sequence": None}),
        ("stop", None, {"stop_reason": "end_turn", "stop_sequence": None}),
    ],
)
def test_anthropic_end_names_a_stop_sequence_only_when_the_output_ended_on_it(
    finish: str | None, sequence: str | None, delta: dict[str, Any]
) -> None:
    summary = StreamSummary(usage=None, finish_reason=finish, duration_ms=1.0,
                            request_id=None, stop_sequence=sequence)
    frames = AnthropicDialect().end(summary)
    events = [json.loads(f.decode().split("data: ", 1)[1]) for f in frames]
    assert [e["delta"] for e in events if e["type"] == "message_delta"] == [delta]


async def test_a_passed_through_anthropic_event_type_cannot_split_the_stream() -> None:
    """The type of a native event is its ``event:`` line: one with a line break (from an
    upstream the app proxies) would write fields of its own. It ends the stream instead."""
    forged = {"type": "ping\ndata: {\"type\":\"message_stop\"}\n\nevent: x", "n": 1}

    async def gen() -> AsyncIterator[Any]:
        yield "a"
        yield forged

    rec = Recorder()
    await rec.run(RequestContextMiddleware(
        endpoint_app(lambda: EventStreamResponse(gen(), dialect=AnthropicDialect()))
    ))
    events = parse(rec.raw).events
    assert [e.type for e in events] == [
        "message_start", "content_block_start", "content_block_delta", "error"
    ]
    assert json.loads(events[-1].data)["error"]["type"] == "api_error"


async def test_a_heartbeat_on_a_closed_connection_means_the_client_left() -> None:
    # ASGI >= 2.4 servers raise OSError from send on a closed connection; an event's send
    # said "the client left", a heartbeat's escaped the task group as an ExceptionGroup (a
    # logged 500) and the context never learned the client was gone.
    state: dict[str, Any] = {}

    class Closing(Recorder):
        async def send(self, message: dict[str, Any]) -> None:
            if message.get("body") == b": ping\n\n":
                raise OSError("connection closed")
            await super().send(message)

    async def gen() -> AsyncIterator[str]:
        try:
            yield "first"
            await anyio.sleep(30)  # silent: a heartbeat is due
            yield "never"
        finally:
            state["closed"] = True

    async def handler(request: Request) -> EventStreamResponse:
        state["ctx"] = current()
        return EventStreamResponse(gen(), heartbeat=0.05)

    rec = Closing()
    app = RequestContextMiddleware(Starlette(routes=[Route("/", handler)]))
    with anyio.fail_after(5):
        await rec.run(app)
    assert state["closed"] and state["ctx"].disconnected
    assert state["ctx"].raw_finish_reason == "cancelled"
    assert [e.data for e in parse(rec.raw).events] == ['{"text":"first"}']


async def test_the_end_on_a_closed_connection_means_the_client_left() -> None:
    # The client left as the last frames ([DONE]) went out: the OSError of that send
    # escaped the stream (a logged 500 after the 200) instead of meaning "the client left".
    state: dict[str, Any] = {}

    class Closing(Recorder):
        async def send(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                raise OSError("connection closed")
            await super().send(message)

    async def handler(request: Request) -> EventStreamResponse:
        state["ctx"] = current()
        return EventStreamResponse(iter(["a", "b"]))

    rec = Closing()
    await rec.run(RequestContextMiddleware(Starlette(routes=[Route("/", handler)])))
    assert state["ctx"].disconnected
    assert [e.data for e in parse(rec.raw).events] == ['{"text":"a"}', '{"text":"b"}']


async def test_a_slow_end_after_a_silence_is_not_taken_for_a_blocked_send() -> None:
    # The end's send did not restart the send-timeout clock: after a silent source (no
    # heartbeat) the watchdog measured it from the last event, long before, and cut the
    # usage event and [DONE] of a client that was reading (its send took 0.8 s of 1 s).
    class SlowEnd(Recorder):
        async def send(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                await anyio.sleep(0.8)
            await super().send(message)

    async def gen() -> AsyncIterator[Any]:
        yield "a"
        await anyio.sleep(1.5)  # the watchdog wakes at ~1 s and ~2 s
        yield Usage(input_tokens=1, output_tokens=1)

    rec = SlowEnd()
    with anyio.fail_after(5):
        await rec.run(endpoint_app(lambda: EventStreamResponse(gen(), send_timeout=1.0)))
    assert rec.messages[-1]["more_body"] is False
    assert rec.raw.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("dialect", "item"),
    [
        (OpenAIChatDialect("gpt-x"),
         {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": -3}}),
        (OpenAIChatDialect("gpt-x"),
         {"choices": [], "usage": {"prompt_tokens": 5, "prompt_tokens_details": "cached"}}),
        (AnthropicDialect(), {"type": "message_start", "message": "hello"}),
        (AnthropicDialect(),
         {"type": "message_start", "message": {"usage": {"input_tokens": "four"}}}),
        (OpenAIChatDialect("gpt-x"), {"choices": 5, "usage": {"prompt_tokens": 3}}),
        (AnthropicDialect(), {"type": "message_delta", "delta": "done", "usage": [1]}),
        (AnthropicDialect(),
         {"type": "message_delta", "delta": {"stop_reason": {"why": 1}}, "usage": "some"}),
    ],
)
async def test_junk_usage_in_a_passed_through_item_is_read_as_zero_not_a_crash(
    dialect: Any, item: dict[str, Any]
) -> None:
    # A proxied upstream's chunk is the app's input: usage with a string, a negative or a
    # non-object where a count or an object belongs is read as Usage's converters read it
    # (junk counts as 0), and the stream goes on to its end, not to an error event.
    async def items() -> AsyncIterator[dict[str, Any]]:
        yield item
        yield {"type": "message_stop"} if isinstance(dialect, AnthropicDialect) else {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    rec = Recorder()
    await rec.run(endpoint_app(lambda: EventStreamResponse(items(), dialect=dialect)))
    events = parse(rec.raw).events
    assert b"error" not in rec.raw, rec.raw
    assert events[-1].data == "[DONE]" or events[-1].type == "message_stop"
