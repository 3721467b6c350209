"""Small ASGI helpers shared by the middlewares (internal)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

from starlette.responses import Response

from aimiddleware.errors import DEFAULT_TYPE_BASE, AIError, render_problem
from aimiddleware.types import Receive, Scope, Send

__all__ = [
    "WrappedResponse", "get_header", "is_async_callable", "is_preflight", "route_path", "send_json",
    "send_problem", "with_hidden_params",
]


def is_async_callable(obj: Any) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or (
        callable(obj) and inspect.iscoroutinefunction(type(obj).__call__)
    )


def with_hidden_params(
    signature: inspect.Signature, hidden: Iterable[tuple[str, type, str | None]]
) -> inspect.Signature:
    """``signature`` plus a keyword-only ``name: kind`` parameter (before any ``**kwargs``) for
    each ``(name, kind, own)`` whose ``own`` (the endpoint's parameter of that kind) is
    ``None``: FastAPI then injects the request or its sub-response for a decorator to pop."""
    params = list(signature.parameters.values())
    at = next(
        (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params)
    )
    keyword = inspect.Parameter.KEYWORD_ONLY
    for name, kind, own in hidden:
        if own is None:
            params.insert(at, inspect.Parameter(name, keyword, annotation=kind))
    return signature.replace(parameters=params)


def route_path(scope: Scope) -> str:
    """The path the app's routes see: ``scope["path"]`` without the ``root_path`` (served
    under ``uvicorn --root-path /api``, the path is ``/api/health``), as Starlette's router
    strips it (``starlette._utils.get_route_path``). Configured paths match this one."""
    path: str = scope["path"]
    root = scope.get("root_path")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root):]
    return rest if not rest or rest[0] == "/" else path  # ("/apix" is not under "/api")


def is_preflight(scope: Scope) -> bool:
    """A CORS preflight: ``OPTIONS`` with ``Access-Control-Request-Method`` (the Fetch
    standard's). A browser sends it on its own, without credentials, before a cross-origin
    request; a ``CORSMiddleware`` inside the stack answers it."""
    return scope["method"] == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope["headers"]
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
    *,
    head: bool = False,
) -> None:
    """``body`` as a whole response; ``head``: the answer to a ``HEAD`` (its headers only)."""
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


class WrappedResponse(Response):
    """An endpoint's response, sent by :meth:`send_inner` (a decorator's way: recorded,
    held under a lease...), with the inner one's status, headers and background tasks, so
    a framework that adds to them (FastAPI's background tasks) reaches the inner one."""

    def __init__(self, inner: Response) -> None:  # (no Response.__init__: nothing to render)
        self.inner = inner
        self.status_code = inner.status_code
        self.raw_headers = inner.raw_headers
        self.background = inner.background

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.background is not None and self.inner.background is None:
            self.inner.background = self.background
        await self.send_inner(scope, receive, send)

    async def send_inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.inner(scope, receive, send)
