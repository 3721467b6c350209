"""Small ASGI helpers shared by the middlewares (internal)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

from aimiddleware.errors import DEFAULT_TYPE_BASE, AIError, render_problem
from aimiddleware.types import Send

__all__ = ["get_header", "is_async_callable", "send_json", "send_problem"]


def is_async_callable(obj: Any) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or (
        callable(obj) and inspect.iscoroutinefunction(type(obj).__call__)
    )


def get_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of header ``name`` (lower-case bytes) in raw ASGI headers."""
    for key, value in headers:
        if key == name:
            return value
    return None


async def send_problem(
    send: Send, err: AIError, request_id: str | None, *, type_base: str = DEFAULT_TYPE_BASE
) -> None:
    status, headers, body = render_problem(err, request_id=request_id, type_base=type_base)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    content_type: bytes = b"application/json",
) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
