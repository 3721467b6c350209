"""``RequestContextMiddleware``: the outermost layer.

Creates the :class:`~aimiddleware.context.RequestContext`: request id (kept from a valid
``X-Request-ID``, else generated, echoed on every response), W3C trace context, the
principal, and the body, read once under a size bound and replayed to the app.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from starlette.concurrency import run_in_threadpool

from aimiddleware._asgi import is_async_callable, route_path, send_problem
from aimiddleware._stream_cut import SENT, SentWatch, says_event_stream
from aimiddleware.context import (
    SCOPE_KEY,
    RequestContext,
    _current,
    begin_context,
    default_principal,
    duplicate_key,
    key_principal,
    new_request_id,
    run_after_response,
    valid_request_id,
)
from aimiddleware.errors import (
    DEFAULT_TYPE_BASE,
    AIError,
    InternalError,
    InvalidRequest,
    RequestTooLarge,
)
from aimiddleware.headers import header_name
from aimiddleware.types import ASGIApp, Message, PrincipalResolver, Receive, Scope, Send
from aimiddleware.usage.accounting import STATE_KEY as USAGE

__all__ = [
    "CLIENT_CLOSED", "RequestContextMiddleware", "end_abandoned", "replay_receive",
    "with_request_id",
]

DUPLICATE_KEY = b"\x00duplicate"  # (new_context's key for two of a key header: a 400)

logger = logging.getLogger("aimiddleware")

DEFAULT_MAX_BODY = 8 * 1024 * 1024


class _Disconnected(Exception):
    pass


def check_options(
    max_body_size: object, request_id_header: object, principal: object
) -> bytes:
    """The context layer's options checked (TypeError / ValueError), by the layer and by
    ``install()`` (Starlette builds the layer on the app's first call); the request-id
    header's name as the layer matches it."""
    if max_body_size is not None and (
        isinstance(max_body_size, bool) or not isinstance(max_body_size, int)
        or max_body_size < 0
    ):
        raise ValueError(f"max_body_size must be a number of bytes >= 0 or None, "
                         f"got {max_body_size!r}")
    if principal is not None and not callable(principal):
        raise TypeError("principal must be a callable (scope) -> str | None")
    return header_name("request_id_header", request_id_header).encode("latin-1")


class RequestContextMiddleware:
    """Outermost layer: one :class:`RequestContext` per HTTP request.

    ``max_body_size``: bytes; a larger body is a 413 without the rest being read
    (``None`` disables the bound). ``principal``: sync or async ``(scope) -> str | None``
    replacing the default (hash of the API key, else client address); it may raise an
    :class:`~aimiddleware.errors.AIError` such as ``AuthenticationFailed``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_size: int | None = DEFAULT_MAX_BODY,
        request_id_header: str = "x-request-id",
        trust_request_id: bool = True,
        principal: PrincipalResolver | None = None,
        error_type_base: str = DEFAULT_TYPE_BASE,
    ) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.header = check_options(max_body_size, request_id_header, principal)
        self._wanted = frozenset(
            (self.header, b"content-length", b"content-type", b"traceparent", b"tracestate",
             b"authorization", b"x-api-key")
        )
        self.trust_request_id = trust_request_id
        self.principal = principal
        self.type_base = error_type_base
        self._principal_async = principal is not None and is_async_callable(principal)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, content_length, key = self.new_context(scope)
        rid_header = (self.header, ctx.request_id.encode("latin-1"))
        out = send
        abandoned = False  # the empty 499 of a client gone went out (see below)

        async def send_with_id(message: Message) -> None:
            nonlocal out, abandoned
            if message["type"] == "http.response.start":
                if message["status"] == CLIENT_CLOSED and ctx.disconnected:
                    # end_abandoned's, from the cancellation layer inside (it ends such a
                    # request itself): no response to anyone, so ctx is not touched (the
                    # after-response hooks, a settlement by the response, see no status,
                    # as under install()'s stack), and none is sent a second time below.
                    abandoned = True
                else:
                    ctx.response_status = message["status"]
                headers = with_request_id(message.get("headers", ()), rid_header)
                message = {**message, "headers": headers}
                state = ctx.state
                if (
                    ctx.stream_error_writer is None  # (not an EventStreamResponse's)
                    and SENT not in state  # (not watched already: a time limit)
                    and USAGE not in state  # (the usage layer read this head's media type)
                    and says_event_stream(headers)
                ):
                    # A foreign event stream: what goes out is watched, so that an error
                    # once it started can end it with an error event (see _stream_cut).
                    out = ctx.state[SENT] = SentWatch(send)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ctx.response_complete = not abandoned
            await out(message)

        token = _current.set(ctx)
        try:
            if await self.read_request(ctx, scope, receive, send_with_id, content_length, key):
                await self.app(scope, replay_receive(ctx, receive), send_with_id)
            if ctx.disconnected and ctx.response_status is None and not abandoned:
                await end_abandoned(send, rid_header)
        finally:
            _current.reset(token)
            if ctx.after_response:  # (usually none)
                await run_after_response(ctx)

    def new_context(self, scope: Scope) -> tuple[RequestContext, int | None, bytes | None]:
        """The request's context (also at ``scope["state"]``), its declared Content-Length
        (``-1``: not an integer) and its API key (for the default principal, found in this
        one scan as :func:`~aimiddleware.context.default_principal` would find it)."""
        incoming_id = traceparent = tracestate = content_type = None
        content_length: int | None = None
        bearer: bytes | None = None  # the bearer token wins
        api_key: bytes | None = None  # else the x-api-key
        auths = api_keys = 0  # more than one of either is a 400 (DUPLICATE_KEY)
        wanted, own = self._wanted, self.header
        for name, value in scope["headers"]:
            if name not in wanted:  # most headers: one set lookup
                continue
            # (the configured request id header first; then the usual ones, most common first)
            if name == own:
                incoming_id = value.decode("latin-1")
            elif name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"content-length":
                if not value.isdigit():
                    content_length = -1
                elif len(value) <= 18:
                    content_length = int(value)
                else:  # (int() refuses over 4300 digits): at least 10**18 bytes, or padded
                    content_length = int(value.lstrip(b"0")[:19] or b"0")
            elif name == b"authorization":
                auths += 1
                scheme, _, cred = value.partition(b" ")
                cred = cred.strip()
                if cred and scheme.lower() == b"bearer":
                    bearer = cred
            elif name == b"traceparent":
                # W3C Trace Context: two traceparent fields make it invalid (a new trace)
                traceparent = "" if traceparent is not None else value.decode("latin-1")
            elif name == b"tracestate":
                # several fields are one list, joined with commas (RFC 9110 section 5.3)
                state = value.decode("latin-1").strip()
                if state:
                    tracestate = f"{tracestate},{state}" if tracestate else state
            else:  # x-api-key
                api_keys += 1
                if value.strip():
                    api_key = value.strip()
        if incoming_id is not None and self.trust_request_id and valid_request_id(incoming_id):
            request_id = incoming_id
        else:
            request_id = new_request_id()
        ctx = begin_context(
            request_id, scope["method"], route_path(scope), traceparent, tracestate, content_type
        )
        scope.setdefault("state", {})[SCOPE_KEY] = ctx
        if auths > 1 or api_keys > 1:
            return ctx, content_length, DUPLICATE_KEY
        return ctx, content_length, bearer if bearer is not None else api_key

    async def read_request(
        self,
        ctx: RequestContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        content_length: int | None,
        key: bytes | None,
    ) -> bool:
        """Resolve the principal and read the body into ``ctx``. False: the request was
        answered here (a typed error sent through ``send``) or the client left."""
        try:
            if self.principal is not None:
                ctx.principal = await self._resolve_principal(scope)
            elif key is DUPLICATE_KEY:
                raise duplicate_key()
            elif key is not None:
                ctx.principal = key_principal(key)
            else:  # (what default_principal answers without a key, without the scan)
                client = scope.get("client")
                ctx.principal = f"ip_{client[0]}" if client else "anonymous"
            if content_length == -1:
                raise InvalidRequest("Content-Length is not a valid integer.")
            limit = self.max_body_size
            if limit is not None and content_length is not None and content_length > limit:
                raise _too_large(limit)
            message = await receive()
            if (
                message["type"] == "http.request"
                and not message.get("more_body", False)
                and (limit is None or len(message.get("body", b"")) <= limit)
            ):  # the whole body in one message (the usual case): no read loop
                ctx.body = message.get("body", b"")
            else:
                ctx.body = await self._read_body(receive, limit, message)
        except AIError as err:
            await send_problem(send, err, ctx.request_id, type_base=self.type_base)
            return False
        except _Disconnected:
            ctx.disconnected = True
            return False
        return True

    async def _resolve_principal(self, scope: Scope) -> str:
        if self.principal is not None:
            try:
                if self._principal_async:
                    found: Any = await self.principal(scope)  # type: ignore[misc]
                else:
                    found = await run_in_threadpool(self.principal, scope)
            except AIError:
                raise
            except Exception as exc:
                logger.exception("principal resolver failed", exc_info=exc)
                raise InternalError() from exc
            if found is not None:
                return str(found)
        return default_principal(scope)

    @staticmethod
    async def _read_body(receive: Receive, limit: int | None, message: Message) -> bytes:
        """The rest of a body sent in several messages, from the first one (``message``)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
            message = await receive()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def with_request_id(
    headers: Iterable[tuple[bytes, bytes]], request_id: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """``headers`` plus the request id header, unless the app set it already."""
    out = list(headers)
    name = request_id[0]
    for key, _ in out:
        if key.lower() == name:
            return out
    out.append(request_id)
    return out


CLIENT_CLOSED = 499
"""The status of a request whose client left before any response (nginx's "client closed
request"): see :func:`end_abandoned`."""


async def end_abandoned(send: Send, request_id: tuple[bytes, bytes] | None) -> None:
    """End a request whose client left before its response started (the app cancelled, or
    the body cut off) with an empty 499: the server drops it, but a middleware outside the
    stack sees the request end with a response. (An app's ``@app.middleware("http")``
    function added after ``install()`` raises "No response returned." without one: a
    traceback and a 500 in the server log.) ``ctx`` is not touched: no response was sent to
    anyone. ``request_id``: the header to send, ``None`` without the context layer (the
    cancellation layer used alone)."""
    length = (b"content-length", b"0")
    try:
        await send({
            "type": "http.response.start", "status": CLIENT_CLOSED,
            "headers": [length] if request_id is None else [request_id, length],
        })
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # (a server may refuse to send to a client that is gone: OSError)
        logger.debug("could not end a request whose client left", exc_info=True)


def replay_receive(ctx: RequestContext, receive: Receive) -> Receive:
    """The app's ``receive``: the body already read into ``ctx``, then the server's messages
    (a disconnect before the response is complete marks ``ctx.disconnected``)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": ctx.body, "more_body": False}
        message = await receive()
        if message["type"] == "http.disconnect" and not ctx.response_complete:
            # (servers also answer http.disconnect once a response is complete)
            ctx.disconnected = True
        return message

    return replay


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body exceeds the limit of {limit} bytes.", extra={"max_bytes": limit}
    )
