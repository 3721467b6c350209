"""Minimal SSE framing for the jobs stream (until the shared ``aimiddleware.sse`` lands)."""

from __future__ import annotations

__all__ = ["sse_frame"]


def sse_frame(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """One event per the WHATWG spec: every data line prefixed, blank line terminator."""
    lines: list[str] = []
    if id is not None:
        if any(c in id for c in "\r\n\0"):
            raise ValueError("an SSE id must not contain CR, LF or NUL")
        lines.append(f"id: {id}")
    if event is not None:
        if any(c in event for c in "\r\n"):
            raise ValueError("an SSE event name must not contain CR or LF")
        lines.append(f"event: {event}")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append(f"data: {line}")
    return ("\n".join(lines) + "\n\n").encode()
