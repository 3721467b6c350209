"""A parser for text/event-stream written from the WHATWG spec (section 9.2.6), for tests.

Deliberately independent of the code under test: decodes UTF-8, strips one leading BOM,
splits lines at CRLF / LF / lone CR, ignores comments, strips one leading space from
values, ignores ids containing NUL, accepts retry made only of ASCII digits, does not
dispatch an event whose data buffer is empty, and discards a partial event at EOF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"([^\r\n]*)(\r\n|\r(?!$)|\n)")


@dataclass(frozen=True)
class Dispatched:
    type: str
    data: str
    last_event_id: str


@dataclass
class ParseResult:
    events: list[Dispatched]
    retry: int | None
    last_event_id: str
    comments: list[str]


def parse(stream: bytes) -> ParseResult:
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    events: list[Dispatched] = []
    comments: list[str] = []
    data = ""
    event_type = ""
    last_id = ""
    retry: int | None = None
    for m in _LINE.finditer(text):
        line = m.group(1)
        if line == "":
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(Dispatched(event_type or "message", data, last_id))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        if ":" in line:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return ParseResult(events, retry, last_id, comments)
