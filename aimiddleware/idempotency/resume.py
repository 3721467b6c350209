"""A stored event stream sent again from after the event a reconnecting client saw last.

An SSE client that reconnects (``fetch-event-source`` and the like) sends the request again,
headers and all, with ``Last-Event-ID``: under the idempotency layer its ``Idempotency-Key``
finds the stream the first connection started, stored or still going out. Sent from its
start, the client would append every event it already has a second time. :class:`After`
drops the stored bytes up to the end of the event that carried that id (a resumable
``EventStreamResponse`` numbers its events, so it is found); an id the stream never carried
drops nothing, as before.

Only a stream stored as it went out (no ``Content-Encoding``) is cut: compressed bytes are
sent whole. (A record keeps chunks only for ``text/event-stream``.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aimiddleware._asgi import get_header
from aimiddleware._encoding import content_coding

__all__ = ["After", "after_event", "as_sent", "last_event_id"]

# The end of an event: two line endings in a row (CRLF, LF or CR; a CR before an LF is
# the CRLF, not an ending of its own).
_BLANK = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")


class After:
    """Feed it a stream's chunks in order: it gives back what follows the event ``last_id``
    named (nothing until that event is over). ``found``: the event was seen."""

    __slots__ = ("_id_line", "_in_event", "_tail", "found")

    def __init__(self, last_id: bytes) -> None:
        # "id:" with an optional space, the value, the line's end (SSE: the field's value)
        self._id_line = re.compile(
            rb"(?:^|(?<=[\r\n]))id: ?" + re.escape(last_id) + rb"(?=\r|\n)"
        )
        self._in_event = False  # the id was seen, the blank line ending its event not yet
        self._tail = b""  # the end of the last chunk, while in that event
        self.found = False

    def feed(self, chunk: bytes) -> bytes:
        if self.found and not self._in_event:
            return chunk
        if not self._in_event:
            match = self._id_line.search(chunk)
            if match is None:
                return b""
            self.found = self._in_event = True
            data, start = chunk, match.end()
        else:  # (the blank line may begin in the chunk before)
            data, start = self._tail + chunk, 0
        blank = _BLANK.search(data, start)
        if blank is None:
            self._tail = data[-2:]
            return b""
        self._in_event = False
        return data[blank.end():]


def after_event(chunks: Iterable[bytes], last_id: bytes) -> list[bytes] | None:
    """The chunks after the event ``last_id``; ``None`` if no event carried that id."""
    after = After(last_id)
    rest = [piece for piece in map(after.feed, chunks) if piece]
    return rest if after.found else None


def last_event_id(headers: Iterable[tuple[bytes, bytes]] | None) -> bytes | None:
    """The request's ``Last-Event-ID`` (``None``: none, or empty)."""
    value = None if headers is None else get_header(headers, b"last-event-id")
    if value is None:
        return None
    return value.strip() or None


def as_sent(stored: Iterable[tuple[str, str]]) -> bool:
    """A stored stream whose bytes are the events as they went out (no content coding)."""
    return not any(
        name.lower() == "content-encoding" and content_coding(value.encode("latin-1"))
        for name, value in stored
    )
