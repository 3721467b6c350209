"""RFC 9457 problem+json rendering of an :class:`~aimiddleware.errors.AIError` (pure).

One body serves RFC 9457 clients and OpenAI SDK clients at once: the problem members
(``type``, ``title``, ``status``, ``detail``, ``instance``) plus ``request_id``, ``retryable``
and an ``error: {type, code, message, param}`` object; the headers carry the retry signals
the official SDKs obey. Imported from :mod:`aimiddleware.errors`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aimiddleware.errors import AIError

logger = logging.getLogger("aimiddleware")

DEFAULT_TYPE_BASE = "urn:aimiddleware:error:"
PROBLEM_JSON = b"application/problem+json"
MAX_RETRY_AFTER = 60.0  # official SDKs ignore longer server delays (reference: errors, section 2)
SHOWN = 64  # the most of a client's string (an id, a field name) an error message repeats


def shown(text: str) -> str:
    """``text`` from the client as an error message repeats it: its first ``SHOWN``
    characters and "..." when longer (an id or a key of any length is not echoed whole)."""
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def problem_body(
    err: AIError, *, request_id: str | None, type_base: str = DEFAULT_TYPE_BASE
) -> dict[str, Any]:
    """The JSON body: RFC 9457 members, extensions, and the OpenAI-compatible ``error``."""
    body: dict[str, Any] = {
        "type": type_base + err.code,
        "title": err.title,
        "status": err.status,
        "detail": err.detail,
    }
    if request_id:
        body["instance"] = f"urn:request:{request_id}"
        body["request_id"] = request_id
    body["retryable"] = err.retryable
    for key, value in err.extra.items():
        body.setdefault(key, value)
    body["error"] = {
        "type": err.openai_type,
        "code": err.code,
        "message": err.detail,
        "param": err.param,
    }
    return body


def error_headers(err: AIError) -> list[tuple[str, str]]:
    """Retry signalling that real SDKs obey, then the error's own headers."""
    headers: list[tuple[str, str]] = []
    if err.retryable:
        headers.append(("x-should-retry", "true"))
        if err.retry_after is not None and not math.isnan(err.retry_after):  # (NaN: no wait)
            delay = min(max(err.retry_after, 0.0), MAX_RETRY_AFTER)
            headers.append(("retry-after", str(max(1, math.ceil(delay)))))
            headers.append(("retry-after-ms", str(max(1, math.ceil(delay * 1000)))))
    else:
        headers.append(("x-should-retry", "false"))
    taken = {name for name, _ in headers}
    headers.extend((k, v) for k, v in err.headers if k.lower() not in taken)
    return headers


def render_problem(
    err: AIError, *, request_id: str | None, type_base: str = DEFAULT_TYPE_BASE
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, raw ASGI headers and body bytes for ``err``."""
    body = json.dumps(
        problem_body(err, request_id=request_id, type_base=type_base),
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    ).encode("utf-8", "backslashreplace")  # a lone surrogate (JSON strings may carry one,
    # UTF-8 cannot) goes out as its JSON escape, \ud83d, as ensure_ascii would write it
    raw = [
        (b"content-type", PROBLEM_JSON),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    for name, value in error_headers(err):
        if _BAD_HEADER.search(name) or _BAD_HEADER.search(value):
            # (say an app's HTTPException header with non-Latin-1 text): the error still goes
            # out, without the header it cannot carry
            logger.warning("dropped an error header that is not a valid header: %r", name)
            continue
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return err.status, raw, body


_BAD_HEADER = re.compile(r"[^\x20-\x7e\x80-\xff\t]")  # outside Latin-1, or a control character
