"""``StackMiddleware``: the layers ``install()`` configures, composed as one ASGI callable.

The layers are the objects a hand-built stack chains, outer to inner::

    Context → Errors → Cancellation → Versioning → Idempotency → RateLimit → Usage → app

and every step is theirs (reading the request, mapping errors, watching for a disconnect,
resolving versions, admitting, accounting). What this class saves is the chaining: seven
``__call__`` frames and five ``send`` wrappers per request, each copying the response head.
Here one wrapper per request (a usage :class:`~aimiddleware.usage.middleware.Responder`)
adds every layer's response headers at once, in the order the chain would: the app's own
(less any rate-limit header it set), usage, rate limit, versioning, request id.

On lifespan shutdown the stack first finishes what its layers left in flight (requests
still unwinding, idempotency records and usage rows waiting for the store), within
``shutdown_grace`` seconds, before the app's own shutdown closes the store: see
:class:`~aimiddleware._shutdown.Drain`.

A request on a rarer path (an ``Idempotency-Key``, a versioning helper route) continues
through the chained layers from that layer inward, so it behaves exactly as it would in
the chain.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio

from aimiddleware._asgi import is_preflight, route_path
from aimiddleware._cancel_watch import LIMIT_SCOPE
from aimiddleware._shutdown import Drain
from aimiddleware._stream_cut import SENT, START, error_writer, last_bytes
from aimiddleware.cancellation import CancellationMiddleware
from aimiddleware.context import RequestContext, _current, run_after_response
from aimiddleware.context_middleware import (
    RequestContextMiddleware,
    end_abandoned,
    replay_receive,
    with_request_id,
)
from aimiddleware.error_middleware import ErrorMiddleware
from aimiddleware.errors import AIError
from aimiddleware.idempotency.middleware import IdempotencyMiddleware
from aimiddleware.ratelimit._run import failed_response, run_request, settle_once, settled_now
from aimiddleware.ratelimit.admission import Admission
from aimiddleware.ratelimit.headers import HEADER_NAMES, merge_rate_headers
from aimiddleware.ratelimit.middleware import RateLimitMiddleware
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send
from aimiddleware.usage.middleware import Responder, UsageMiddleware, serve
from aimiddleware.versioning.middleware import VersioningMiddleware

__all__ = ["StackMiddleware"]

Layer = tuple[type[Any], dict[str, Any]]
RawHeaders = list[tuple[bytes, bytes]]


class StackMiddleware:
    """``layers``: ``(middleware class, options)`` outermost first, as ``install()`` builds
    them; the context and error layers are required, the others optional.
    ``shutdown_grace``: seconds the lifespan shutdown waits for what is in flight."""

    def __init__(
        self, app: ASGIApp, *, layers: Sequence[Layer], shutdown_grace: float = 5.0
    ) -> None:
        self.app = app
        self.layers = tuple(layers)
        chain = app
        built: dict[type[Any], Any] = {}
        for cls, options in reversed(self.layers):
            chain = cls(chain, **options)
            built[cls] = chain
        context = built.get(RequestContextMiddleware)
        errors = built.get(ErrorMiddleware)
        if context is None or errors is None:
            raise ValueError("StackMiddleware needs the context and error layers")
        self.context: RequestContextMiddleware = context
        self.errors: ErrorMiddleware = errors
        self.cancellation: CancellationMiddleware | None = built.get(CancellationMiddleware)
        self.versioning: VersioningMiddleware | None = built.get(VersioningMiddleware)
        self.idempotency: IdempotencyMiddleware | None = built.get(IdempotencyMiddleware)
        self.ratelimit: RateLimitMiddleware | None = built.get(RateLimitMiddleware)
        usage: UsageMiddleware | None = built.get(UsageMiddleware)
        self.accounting = usage.accounting if usage is not None else None
        # Response header names some layer sets: an app header among them needs the careful
        # merge (each layer's own rule); any other head just gets ours appended.
        ours = {self.context.header}
        if self.ratelimit is not None:
            ours.update(name.encode() for name in HEADER_NAMES)
        if self.versioning is not None:
            ours.update(self.versioning._added_names)
        self._ours = frozenset(ours)
        self.drain = Drain(
            shutdown_grace,
            self.idempotency.engine if self.idempotency is not None else None,
            self.accounting.settings.ledger if self.accounting is not None else None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # every layer passes these through
            if scope["type"] == "lifespan":  # (the shutdown drains the stack first)
                receive = self.drain.receive(receive)
            await self.app(scope, receive, send)
            return
        context = self.context
        ctx, content_length, key = context.new_context(scope)
        exchange = _Exchange(self, ctx, send)
        token = _current.set(ctx)
        drain = self.drain
        drain.active += 1
        try:
            if not await context.read_request(
                ctx, scope, receive, exchange.outer, content_length, key
            ):
                if ctx.disconnected:  # (the client left while sending its body)
                    await end_abandoned(send, exchange.request_id)
                return
            try:
                cancellation = self.cancellation
                timeout = cancellation.timeout_for(ctx.path) if cancellation else None
                if timeout is not None and cancellation is not None:
                    # What goes out is watched: a foreign event stream cut by the limit
                    # may end with an error event (see _stream_cut and _Exchange.writer).
                    exchange.sent_tail = START
                    ctx.state[SENT] = exchange
                    await cancellation.serve(
                        exchange.run, scope, receive, exchange.send, ctx, timeout
                    )
                elif cancellation is not None and cancellation.cancel_on_disconnect:
                    await cancellation.serve(exchange.run, scope, receive, exchange.send, ctx, None)
                else:
                    await exchange.run(scope, replay_receive(ctx, receive), exchange.send)
            except Exception as exc:
                started = ctx.response_status is not None
                await self.errors.handle(exc, scope, ctx, exchange.outer, started=started)
            except anyio.get_cancelled_exc_class():  # (the server's: see ErrorMiddleware)
                started = ctx.response_status is not None
                await self.errors.answer_cancelled(scope, ctx, exchange.outer, started=started)
                raise
            if ctx.disconnected and ctx.response_status is None:  # (cancelled: client gone)
                await end_abandoned(send, exchange.request_id)
        finally:
            _current.reset(token)
            if ctx.after_response:  # (usually none; still in flight for the drain meanwhile)
                try:
                    await run_after_response(ctx)
                finally:
                    drain.active -= 1
            else:
                drain.active -= 1
            # The exchange sends bodies through its own bound method: break that cycle so
            # the request's objects are freed now, not by the cyclic garbage collector.
            exchange._send = exchange.raw_send

    def merged_headers(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        usage: RawHeaders,
        ratelimit: RawHeaders | None,
        versioning: tuple[tuple[bytes, bytes], ...],
        request_id: tuple[bytes, bytes],
    ) -> RawHeaders:
        """A head whose app headers name one of ours: each layer's rule, innermost first."""
        out = [*headers, *usage]
        if ratelimit:
            out = merge_rate_headers(out, ratelimit)
        if versioning and self.versioning is not None:
            out = self.versioning.add_headers(out, versioning)
        return with_request_id(out, request_id)


class _Exchange(Responder):
    """One request through the stack: the inner layers' steps, and its one ``send`` wrapper.

    ``send`` (the app's) holds, scans or passes the response as the usage layer does; every
    head is built by :meth:`head` with all the layers' headers, every body goes through
    :meth:`outer`, which does what the context layer's wrapper does (status, completion).
    """

    __slots__ = (
        "admission", "rate_headers", "raw_send", "request_id", "sent_head", "sent_tail", "stack",
        "version_headers",
    )

    def __init__(self, stack: StackMiddleware, ctx: RequestContext, send: Send) -> None:
        Responder.__init__(self, stack.accounting, ctx, self.outer)  # (no super object)
        self.stack = stack
        self.raw_send = self.head_send = send  # heads go out directly (see head)
        self.request_id = (stack.context.header, ctx.request_id.encode("latin-1"))
        self.rate_headers: RawHeaders | None = None
        self.admission: Admission | None = None  # (rate limited: settled once sent whole)
        self.version_headers: tuple[tuple[bytes, bytes], ...] = ()
        # What went out, noted under a time limit only (sent_tail None: not watched)
        self.sent_head: Message | None = None
        self.sent_tail: bytes | None = None

    async def outer(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":  # a head that did not come through head()
            self.ctx.response_status = message["status"]
            headers = with_request_id(message.get("headers", ()), self.request_id)
            message = {**message, "headers": headers}
        elif kind == "http.response.body" and not message.get("more_body"):
            self.ctx.response_complete = True
            await self.raw_send(message)
            # The time limit bounds the response, not what the app runs after it (the
            # cancellation layer's own send wrapper, which lifts it, is not on this path).
            limited = self.ctx.state.get(LIMIT_SCOPE)
            if limited is not None:
                limited.deadline = math.inf
            # Sent whole: the rate limiter settles now, not once the app returns (after
            # the background tasks it may run: see run_request).
            admission = self.admission
            if admission is not None and not admission.done:
                limiter = self.stack.ratelimit.limiter  # type: ignore[union-attr]
                failed = failed_response(self.ctx)
                if not settled_now(limiter, admission, self.ctx, failed):
                    await settle_once(limiter, admission, self.ctx, failed)
            return
        await self.raw_send(message)
        if self.sent_tail is not None:  # watched (a time limit): what went out, for writer
            if kind == "http.response.body":
                self.sent_tail = last_bytes(self.sent_tail, message.get("body", b""))
            elif kind == "http.response.start":
                self.sent_head = message

    def watch_stream(self) -> None:
        """A foreign event stream starts: noted from here by :meth:`outer` and :meth:`head`
        (already, under a time limit)."""
        if self.sent_tail is None:
            self.sent_tail = START
            self.ctx.state[SENT] = self

    def writer(
        self, ctx: RequestContext, seconds: float
    ) -> Callable[[AIError], Awaitable[None]] | None:
        """``ctx.state[SENT]`` of a time-limited request or a foreign event stream:
        :func:`~aimiddleware._stream_cut.error_writer` of what went out (every head and body
        passes here, or through :meth:`head`: no wrapper more per message)."""
        return error_writer(self.sent_head, self.sent_tail or START, self.raw_send, ctx, seconds)

    def head(self, message: Message, added: RawHeaders) -> Message:
        headers = message.get("headers", ())
        ours = self.stack._ours
        for key, _ in headers:
            if key.lower() in ours:  # rare: the app set one of the layers' headers itself
                out = self.stack.merged_headers(
                    headers, added, self.rate_headers, self.version_headers, self.request_id
                )
                break
        else:
            out = [*headers, *added]
            if self.rate_headers:
                out += self.rate_headers
            if self.version_headers:
                out += self.version_headers
            out.append(self.request_id)
        self.ctx.response_status = message["status"]
        head = {**message, "headers": out}
        if self.sent_tail is not None:  # watched: the head (sent next by head_send)
            self.sent_head = head
        return head

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Versioning, idempotency, rate limiting and usage around the app."""
        stack, ctx = self.stack, self.ctx
        versioning = stack.versioning
        if versioning is not None:
            if versioning.is_helper_route(ctx.path, scope["method"]):  # (the route path)
                self.acc = None
                await versioning(scope, receive, send)
                return
            resolved = versioning.resolve_now(scope, ctx)  # (no coroutine, the usual case)
            if resolved is None:
                scope, self.version_headers = await versioning.resolve(scope, ctx)
            else:
                scope, self.version_headers, deprecated = resolved
                if deprecated:
                    await versioning.record(ctx, deprecated)
        idempotency = stack.idempotency
        if idempotency is not None and idempotency.applies(scope):
            self.acc = None  # the chained layers from here on add their own headers
            await idempotency(scope, receive, send)
            return
        ratelimit = stack.ratelimit
        if (
            ratelimit is None
            or (ratelimit.has_exempt and ratelimit.is_exempt(route_path(scope)))
            or (scope["method"] == "OPTIONS" and is_preflight(scope))
        ):
            if self.acc is None:
                await stack.app(scope, receive, send)
            else:
                await serve(stack.app, scope, receive, self)
            return
        limiter = ratelimit.limiter
        content_type = ctx.content_type  # (from the context layer's header scan)
        admission = limiter.admit_now(ctx, content_type)  # (a coroutine only when it must wait)
        if admission is None:
            admission = await limiter.admit(ctx, content_type=content_type)
        self.rate_headers = admission.raw_headers
        self.admission = admission
        if self.acc is None:
            await run_request(limiter, admission, ctx, stack.app, scope, receive, send)
        else:
            await run_request(limiter, admission, ctx, serve, stack.app, scope, receive, self)
