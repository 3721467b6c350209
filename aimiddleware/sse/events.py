"""Server-sent event framing exact to the WHATWG rules: pure functions, no I/O.

What a conforming parser (a browser's ``EventSource``, httpx-sse, the OpenAI SDK) does with
the bytes this module writes:

- every line of ``data`` arrives, joined with LF: a value is split at CRLF, LF and lone CR,
  one ``data:`` line each, so CR and CRLF inside data arrive as LF (the wire cannot carry a
  bare CR in a field value);
- ``id`` sets the last event id; it may not contain NUL, CR or LF (a parser ignores an id
  with NUL, and a newline would end the field), and ``""`` resets it;
- ``retry`` is a non-negative integer of milliseconds;
- an event without ``data`` is **never dispatched** by a browser (only its ``id`` and
  ``retry`` take effect), so terminal markers must carry data;
- comments (lines starting with ``:``) are ignored by parsers: heartbeats are comments.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ServerSentEvent",
    "encode_comment",
    "encode_data",
    "json_data",
    "split_lines",
    "without_ids",
]


def split_lines(value: str) -> list[str]:
    """Split at CRLF, LF or lone CR: the three line ends of the event-stream grammar."""
    if "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    return value.split("\n")


def _check_field(name: str, value: str, forbid_nul: bool) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE {name} must not contain CR or LF")
    if forbid_nul and "\x00" in value:
        raise ValueError(f"SSE {name} must not contain NUL")


def encode_comment(text: str = "") -> bytes:
    """A comment block (each line prefixed by ``:``) ending in a blank line."""
    return ("".join(f": {line}\n" if line else ":\n" for line in split_lines(text)) + "\n").encode()


def encode_data(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """Fast path for the commonest frame; same bytes as ``ServerSentEvent(...).encode()``."""
    head = ""
    if id is not None:
        _check_field("id", id, True)
        head = f"id: {id}\n"
    if event is not None:
        _check_field("event", event, False)
        head += f"event: {event}\n"
    if "\n" in data or "\r" in data:
        body = "".join(f"data: {line}\n" for line in split_lines(data))
        return f"{head}{body}\n".encode()
    return f"{head}data: {data}\n\n".encode()


# An ``id`` field line: "id", or "id:" and a value, to its line end (CRLF, LF or CR).
_ID_LINE = re.compile(rb"(?m)(?:^|(?<=\r))id(?::[^\r\n]*)?(?:\r\n|\r|\n|\Z)")


def without_ids(frame: bytes) -> bytes:
    """``frame`` without its ``id`` field lines (a resumable stream numbers its events)."""
    if frame.startswith(b"id") or b"\nid" in frame or b"\rid" in frame:
        return _ID_LINE.sub(b"", frame)
    return frame


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_data(value: Any) -> str:
    """Compact JSON for a ``data`` field (one line: JSON strings escape their newlines).

    A lone surrogate (half of an emoji split across two deltas by an upstream, as some
    OpenAI-compatible ones do) is written escaped (``\\ud83d``), as JSON carries it: UTF-8
    has no encoding for it, and the frame could not be sent.
    """
    text = _JSON.encode(value)
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(_escape_surrogate, text)  # (only inside JSON strings)


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event. ``data=None`` writes no ``data:`` line: browsers will not dispatch it.

    ``comment`` is written first (one ``:`` line per line); an event with only a comment is a
    heartbeat. Values are validated on construction (``ValueError`` / ``TypeError``).
    """

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        if self.data is not None and not isinstance(self.data, str):
            raise TypeError("SSE data must be a str (use json_data() for objects)")
        if self.event is not None:
            if not isinstance(self.event, str):
                raise TypeError("SSE event must be a str")
            _check_field("event", self.event, False)
        if self.id is not None:
            if not isinstance(self.id, str):
                raise TypeError("SSE id must be a str")
            _check_field("id", self.id, True)
        if self.retry is not None and (
            not isinstance(self.retry, int) or isinstance(self.retry, bool) or self.retry < 0
        ):
            raise ValueError("SSE retry must be a non-negative int of milliseconds")
        if self.comment is not None and not isinstance(self.comment, str):
            raise TypeError("SSE comment must be a str")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ServerSentEvent:
        """Build from ``{"data": ..., "event": ..., ...}``; non-str data is JSON-encoded."""
        data = fields.get("data")
        if data is not None and not isinstance(data, str):
            fields = {**fields, "data": json_data(data)}
        return cls(**fields)

    def with_id(self, id: str) -> ServerSentEvent:
        return ServerSentEvent(self.data, self.event, id, self.retry, self.comment)

    def encode(self) -> bytes:
        """The event's bytes, ending with the blank line that dispatches it."""
        parts: list[str] = []
        if self.comment is not None:
            parts.extend(f": {line}\n" if line else ":\n" for line in split_lines(self.comment))
        if self.id is not None:
            parts.append(f"id: {self.id}\n")
        if self.event is not None:
            parts.append(f"event: {self.event}\n")
        if self.retry is not None:
            parts.append(f"retry: {self.retry}\n")
        if self.data is not None:
            parts.extend(f"data: {line}\n" for line in split_lines(self.data))
        parts.append("\n")
        return "".join(parts).encode()

    @property
    def dispatched(self) -> bool:
        """Whether a conforming client fires an event for it (it needs a ``data`` line)."""
        return self.data is not None
