"""SSE framing: exact bytes, validation, and round trips through two independent parsers."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import connect_sse
from hypothesis import given, settings
from hypothesis import strategies as st

from aimiddleware.sse import (
    ServerSentEvent,
    encode_comment,
    encode_data,
    json_data,
    split_lines,
)
from aimiddleware.sse.events import without_ids
from tests.sse_spec import Dispatched, parse

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
NO_NEWLINE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"),
                     max_size=20)
IDS = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\x00"),
              max_size=20)

EVENTS = st.builds(
    ServerSentEvent,
    data=st.none() | TEXT,
    event=st.none() | NO_NEWLINE,
    id=st.none() | IDS,
    retry=st.none() | st.integers(0, 10**9),
    comment=st.none() | TEXT,
)


def normalized(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


def expected(events: list[ServerSentEvent]) -> tuple[list[Dispatched], int | None]:
    out: list[Dispatched] = []
    last_id = ""
    retry = None
    for ev in events:
        if ev.id is not None:
            last_id = ev.id
        if ev.retry is not None:
            retry = ev.retry
        if ev.data is not None:
            out.append(Dispatched(ev.event or "message", normalized(ev.data), last_id))
    return out, retry


def test_exact_bytes() -> None:
    ev = ServerSentEvent(data="a\nb\r\nc\rd", event="delta", id="s:1", retry=1500, comment="hi")
    assert ev.encode() == (
        b": hi\nid: s:1\nevent: delta\nretry: 1500\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )
    assert ServerSentEvent(data="").encode() == b"data: \n\n"
    assert ServerSentEvent(data="x\n").encode() == b"data: x\ndata: \n\n"
    assert encode_comment("") == b":\n\n"
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    assert split_lines("a\r\n\rb\n") == ["a", "", "b", ""]


def test_event_without_data_is_not_dispatched() -> None:
    ev = ServerSentEvent(event="done")
    assert not ev.dispatched
    assert parse(ev.encode()).events == []
    assert parse(ServerSentEvent(event="done", data="[DONE]").encode()).events == [
        Dispatched("done", "[DONE]", "")
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"id": "a\nb"},
        {"id": "a\rb"},
        {"id": "a\x00b"},
        {"event": "x\ny"},
        {"retry": -1},
        {"retry": True},
        {"retry": 1.5},
    ],
)
def test_validation_value_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        ServerSentEvent(data="x", **kwargs)  # type: ignore[arg-type]


def test_validation_type_errors() -> None:
    with pytest.raises(TypeError):
        ServerSentEvent(data=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_data("x", id="a\x00")


def test_from_dict_encodes_objects_as_json() -> None:
    ev = ServerSentEvent.from_dict({"data": {"a": [1, "é"]}, "event": "x"})
    assert ev.data == '{"a":[1,"é"]}'


@settings(max_examples=300, deadline=None)
@given(ev=EVENTS)
def test_fast_path_matches_model(ev: ServerSentEvent) -> None:
    if ev.data is not None and ev.retry is None and ev.comment is None:
        assert encode_data(ev.data, ev.event, ev.id) == ev.encode()


@settings(max_examples=400, deadline=None)
@given(events=st.lists(EVENTS, max_size=6))
def test_spec_parser_recovers_what_was_sent(events: list[ServerSentEvent]) -> None:
    result = parse(b"".join(e.encode() for e in events))
    want, retry = expected(events)
    assert result.events == want
    assert result.retry == retry
    comments = [line for e in events if e.comment is not None for line in split_lines(e.comment)]
    assert [c.removeprefix(" ") for c in result.comments] == comments


@settings(max_examples=200, deadline=None)
@given(events=st.lists(EVENTS.filter(lambda e: e.data is not None), max_size=6),
       cut=st.integers(1, 7))
def test_httpx_sse_recovers_what_was_sent(events: list[ServerSentEvent], cut: int) -> None:
    # Only events with data: httpx-sse (unlike the spec and browsers) also dispatches an
    # event that has an id or event name but no data line.
    raw = b"".join(e.encode() for e in events)
    chunks = [raw[i : i + cut] for i in range(0, len(raw), cut)]  # split anywhere, even in UTF-8

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=iter(chunks)
        )

    with httpx.Client(transport=httpx.MockTransport(handler)) as client, connect_sse(
        client, "GET", "http://test/"
    ) as source:
        got = [(s.event, s.data, s.id, s.retry) for s in source.iter_sse()]
    want, _ = expected(events)
    assert [(g[0], g[1], g[2]) for g in got] == [(w.type, w.data, w.last_event_id) for w in want]


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@settings(max_examples=300)
@given(st.text(alphabet=st.one_of(SURROGATES, st.characters(max_codepoint=0x10FFFF))))
def test_json_data_is_valid_utf8_json_for_any_text(text: str) -> None:
    # Lone surrogates (an emoji's halves split across deltas) could not be encoded: they
    # go out escaped, and decode back to the very same code points.
    # (as UTF-16: a high and a low half side by side decode as the character they make)
    def utf16(value: str) -> str:
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")

    data = json_data([text])
    assert [utf16(t) for t in json.loads(data.encode("utf-8"))] == [utf16(text)]
    assert "\n" not in data and "\r" not in data


def test_json_data_escapes_only_surrogates() -> None:
    assert json_data("é😀\ud83d") == '"é😀\\ud83d"'
    assert json_data("\\\udcaf") == '"\\\\\\udcaf"'
    assert json_data({"\ud83d": "\ude00"}) == '{"\\ud83d":"\\ude00"}'
    assert json.loads(json_data("\ud83d") + "\n") == "\ud83d"
    assert json.loads(json_data(["\ud83d\ude00"])) == ["😀"]  # halves together: one


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"id: 7\ndata: x\n\n", b"data: x\n\n"),
        (b'data: {"id": 1}\nid\n\n', b'data: {"id": 1}\n\n'),  # a bare "id" line too
        (b"event: a\r\nid: 9\r\ndata: y\r\n\r\n", b"event: a\r\ndata: y\r\n\r\n"),
        (b"data: a\rid: 3\rdata: b\r\r", b"data: a\rdata: b\r\r"),
        (b"idx: 1\ndata: z\n\n", b"idx: 1\ndata: z\n\n"),  # another field
        (b"data: id: 1\n\n", b"data: id: 1\n\n"),  # in a value
    ],
)
def test_without_ids_drops_only_id_field_lines(frame: bytes, expected: bytes) -> None:
    assert without_ids(frame) == expected
