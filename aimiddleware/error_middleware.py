"""``ErrorMiddleware``: any exception below becomes a typed problem+json response.

Before the response has started, the mapped :class:`~aimiddleware.errors.AIError` is
rendered as ``application/problem+json``. After it has started, a status line can no longer
change: an event stream gets the error in its own dialect (through the context's
``stream_error_writer``, set by the SSE layer, or for another event stream that was
watched and ends at an event boundary: see ``aimiddleware._stream_cut``); any other response
is aborted (the server closes the connection) and the error is logged with the request id.

A cancellation from outside the stack (the server giving up on the request: uvicorn past
``--timeout-graceful-shutdown``) is answered the same way with a retryable ``overloaded``
503 ("shutting down"), then re-raised: the client gets a typed answer, or an event stream
its error event and end, instead of the server's bare 500 or a cut stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from aimiddleware._asgi import send_problem
from aimiddleware.context import RequestContext, _current, current_or_none
from aimiddleware.errors import (
    DEFAULT_TYPE_BASE,
    AIError,
    ExceptionMapper,
    InvalidRequest,
    Mapper,
    Overloaded,
    render_problem,
)
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ErrorMiddleware", "register_exception_handlers"]

logger = logging.getLogger("aimiddleware")

ERROR_SEND = "errors.send"
"""``ctx.state`` key: this layer's own ``send``, set as it has a started event stream write
its error event. A writer whose own ``send`` ended with the app sends through it instead: an
app's ``@app.middleware("http")`` function between the stream and the stack relays through a
memory stream that is closed once the app is cancelled."""


_SHUTTING_DOWN = "The server is shutting down; retry the request."
_CANCEL_ANSWER_TIMEOUT = 1.0
_STREAM_ERROR_TIMEOUT = 5.0  # (s) a foreign event stream's error event (cleanup_timeout's)


def _stream_writer(
    ctx: RequestContext, seconds: float
) -> Callable[[AIError], Awaitable[None]] | None:
    """:func:`aimiddleware._stream_cut.stream_writer` (imported here: it imports this
    module)."""
    from aimiddleware._stream_cut import stream_writer

    return stream_writer(ctx, seconds)


class ErrorMiddleware:
    """Maps exceptions to the taxonomy. ``mappings`` adds ``{ExcType: fn(exc) -> AIError}``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        mapper: ExceptionMapper | None = None,
        mappings: Mapping[type[BaseException], Mapper] | None = None,
        error_type_base: str = DEFAULT_TYPE_BASE,
        on_error: Callable[[AIError, BaseException], Any] | None = None,
    ) -> None:
        if mapper is not None and mappings:
            raise ValueError("pass either mapper or mappings, not both")
        self.app = app
        self.mapper = mapper or ExceptionMapper(mappings)
        self.type_base = error_type_base
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        ctx = _current.get()
        started = False
        inner_send = send
        if ctx is None:  # used without the context layer: watch the start ourselves

            async def inner_send(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                await send(message)

        try:
            await self.app(scope, receive, inner_send)
        except Exception as exc:
            if ctx is not None:
                started = ctx.response_status is not None
            await self.handle(exc, scope, ctx, send, started=started)
        except anyio.get_cancelled_exc_class():
            if ctx is not None:
                started = ctx.response_status is not None
            await self.answer_cancelled(scope, ctx, send, started=started)
            raise

    async def answer_cancelled(
        self, scope: Scope, ctx: RequestContext | None, send: Send, *, started: bool
    ) -> None:
        """The request was cancelled from outside the stack (the stack's own cancellations,
        a disconnect or a timeout tier, end inside it): the server is giving up on it, as
        uvicorn does to what is still running past ``--timeout-graceful-shutdown``. Answer
        a retryable 503, or end a started event stream with that error event; shielded and
        bounded (the client may be gone). The caller re-raises the cancellation."""
        if started and (ctx is None or _stream_writer(ctx, _CANCEL_ANSWER_TIMEOUT) is None):
            return  # (a started response of another kind can only be cut off)
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_ANSWER_TIMEOUT):
            try:
                await self.handle(Overloaded(_SHUTTING_DOWN), scope, ctx, send, started=started)
            except Exception:  # the connection is going away: nothing more to tell anyone
                logger.debug("could not answer a cancelled request", exc_info=True)

    async def handle(
        self,
        exc: Exception,
        scope: Scope,
        ctx: RequestContext | None,
        send: Send,
        *,
        started: bool,
    ) -> None:
        """Answer ``exc`` raised below: a problem response through ``send`` before the response
        started, an error event on a started event stream; else log and re-raise."""
        err = self.mapper.map(exc)
        if (
            isinstance(exc, (json.JSONDecodeError, RecursionError))
            and ctx
            and ctx.body
            and ctx.json() is None
        ):
            # The endpoint parsed the client's malformed body: that is the client's error.
            err = InvalidRequest("The request body is not valid JSON (or nests too deeply).")
        request_id = ctx.request_id if ctx is not None else None
        if err.status >= 500 and not isinstance(exc, AIError):
            logger.error(
                "unhandled %s on %s %s [request_id=%s]",
                type(exc).__name__,
                scope.get("method"),
                scope.get("path"),
                request_id,
                exc_info=exc,
            )
        if self.on_error is not None:
            try:
                self.on_error(err, exc)
            except Exception:  # a failing hook must not replace the answer to the client
                logger.exception("on_error callback failed [request_id=%s]", request_id)
        if not started:
            await send_problem(send, err, request_id, type_base=self.type_base)
        elif ctx is not None and (writer := _stream_writer(ctx, _STREAM_ERROR_TIMEOUT)):
            ctx.state[ERROR_SEND] = send
            await writer(err)
        else:
            logger.error(
                "%s after the response started; closing the connection [request_id=%s]",
                err.code,
                request_id,
            )
            raise exc


def register_exception_handlers(
    app: Any, *, mapper: ExceptionMapper | None = None, error_type_base: str = DEFAULT_TYPE_BASE
) -> None:
    """Make a Starlette/FastAPI app's own handlers render the taxonomy.

    Starlette and FastAPI handle ``HTTPException`` (and FastAPI request validation errors)
    inside the router, before any middleware sees them; this replaces the frameworks' default
    handlers for them. A handler the app registered itself for one of them is kept.
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response

    mapper = mapper or ExceptionMapper()

    async def handler(request: Request, exc: Exception) -> Response:
        ctx = current_or_none()
        err = mapper.map(exc)
        status, headers, body = render_problem(
            err, request_id=ctx.request_id if ctx else None, type_base=error_type_base
        )
        response = Response(body, status_code=status)
        response.raw_headers = headers
        return response

    try:
        from fastapi.exception_handlers import (
            http_exception_handler,
            request_validation_exception_handler,
        )
        from fastapi.exceptions import RequestValidationError
    except ImportError:  # pragma: no cover - FastAPI is optional
        pairs: list[tuple[type[Exception], Any]] = [(HTTPException, None)]
    else:
        pairs = [(HTTPException, http_exception_handler),
                 (RequestValidationError, request_validation_exception_handler)]
    own = getattr(app, "exception_handlers", {})
    for cls, default in pairs:
        if own.get(cls, default) is default:  # (none, or the framework's default)
            app.add_exception_handler(cls, handler)
