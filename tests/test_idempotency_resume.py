"""Cutting a stored event stream after the event a reconnecting client saw last (pure)."""

from __future__ import annotations

import pytest

from aimiddleware.idempotency.resume import (
    After,
    after_event,
    as_sent,
    last_event_id,
)

CHUNKS = [
    b"id: s:1\ndata: a\n\n",
    b"id: s:2\ndata: b\n\n",
    b"id: s:3\r\ndata: c\r\n\r\nid: s:4\rdata: d\r\r",
    b"event: done\ndata: [DONE]\n\n",
]


@pytest.mark.parametrize(
    ("last", "rest"),
    [
        (b"s:1", CHUNKS[1:]),
        (b"s:3", [b"id: s:4\rdata: d\r\r", CHUNKS[3]]),  # inside a chunk, CRLF and CR lines
        (b"s:4", CHUNKS[3:]),
        (b"s:9", None),  # never carried
        (b"s:", None),  # a prefix of an id is not the id
    ],
)
def test_after_event(last: bytes, rest: list[bytes] | None) -> None:
    assert after_event(CHUNKS, last) == rest


def test_an_event_split_across_chunks_is_dropped_to_its_end() -> None:
    after = After(b"s:1")
    assert after.feed(b"data: x\n\nid: s:1\ndata: par") == b""
    assert after.feed(b"t\ndata: more\n") == b""
    assert after.feed(b"\nid: s:2\ndata: y\n\n") == b"id: s:2\ndata: y\n\n"
    assert after.found


def test_a_data_line_naming_the_id_is_not_the_id() -> None:
    assert after_event([b"data: id: s:1\n\n", b"data: z\n\n"], b"s:1") is None


def test_headers() -> None:
    assert last_event_id([(b"last-event-id", b" s:3 ")]) == b"s:3"
    assert last_event_id([(b"last-event-id", b"")]) is None
    assert last_event_id(None) is None
    assert as_sent([("content-type", "text/event-stream"), ("Content-Encoding", "identity")])
    assert not as_sent([("content-type", "text/event-stream"), ("content-encoding", "gzip")])
