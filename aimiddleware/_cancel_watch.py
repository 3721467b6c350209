"""One request under ``CancellationMiddleware``'s watch, and the loop's sweeper.

:class:`_Call` is the per-request part: it gives the app its ``receive`` (the body, then
``http.disconnect`` when the client goes), runs the watcher that waits for the disconnect
and cancels the app's scope (spliced in then, see :mod:`aimiddleware._scope_splice`, when
none was entered), notes the end of the response, and after a cancellation runs the
:func:`~aimiddleware.cancellation.on_cancel` callbacks shielded, then raises the 504 of a
timeout. :class:`_Sweeper` is one timer per event loop that starts the watcher of each
request still running after ``watch_after``, so a fast request pays for no task.

Also here, as the watcher reads and writes them (re-exported by
:mod:`aimiddleware.cancellation`): the ``ctx.state`` keys and :func:`cleanup_scope`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import copy_context
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from aimiddleware._asgi import is_async_callable
from aimiddleware._scope_splice import _splice
from aimiddleware._stream_cut import stream_writer
from aimiddleware.context import RequestContext
from aimiddleware.context_middleware import end_abandoned
from aimiddleware.errors import Timeout
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from aimiddleware.cancellation import CancellationMiddleware

logger = logging.getLogger("aimiddleware")

CANCEL_ON_DISCONNECT = "cancel_on_disconnect"
"""``ctx.state`` key: set to ``False`` (as a resumable event stream does) to keep running
after the client leaves; the time limit still applies."""
_CALLBACKS = "cancellation.callbacks"
STATE_KEY = "cancellation"
LIMIT_SCOPE = "cancellation.scope"
"""``ctx.state`` key: the scope that bounds a request with a time limit, for a send wrapper
other than this layer's own (``install()``'s stack) to lift the limit once the response has
been sent whole (its deadline set to ``math.inf``, as :meth:`_Call.send` does)."""


def cleanup_scope(seconds: float = 5.0) -> anyio.CancelScope:
    """A shielded scope with a deadline, for cleanup that must run after a cancellation."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + seconds)


class _Sweeper:
    """Starts the watcher of each request still running ``after`` seconds after it began.

    One timer per event loop (firing at most every ``after / 4`` s while requests are in
    flight) instead of one timer per request: a request enters a dict of the running ones
    (in start order) and leaves it when it ends, so nothing outlives it.
    """

    __slots__ = ("after", "context", "handle", "loop", "owner", "running")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, after: float, owner: CancellationMiddleware
    ) -> None:
        self.loop = loop
        self.after = after
        self.owner = owner
        self.running: dict[_Call, float] = {}  # request -> when its watcher is due (loop time)
        self.handle: asyncio.TimerHandle | None = None
        self.context = contextvars.Context()  # the timer runs in no request's context

    def arm(self) -> None:
        self.handle = self.loop.call_later(self.after, self._tick, context=self.context)

    def _tick(self) -> None:
        self.handle = None
        now = self.loop.time()
        running = self.running
        due = []
        for call, when in running.items():
            if when > now:
                break
            due.append(call)
        for call in due:
            del running[call]
            call.start_watcher()
        if running:
            when = max(next(iter(running.values())), now + self.after / 4)
            self.handle = self.loop.call_at(when, self._tick, context=self.context)
        else:
            self.owner._retire(self)


class _Call:
    """One request under watch: the app's ``receive``, the watcher, the cancelled path."""

    __slots__ = (
        "__weakref__",
        "answers",
        "app_scope",
        "context",
        "ctx",
        "disconnected",
        "host",
        "loop",
        "mw",
        "pending",
        "reason",
        "receive_server",
        "response_done",
        "send_server",
        "sent",
        "watch_done",
        "watcher",
    )

    def __init__(
        self,
        mw: CancellationMiddleware,
        ctx: RequestContext | None,
        receive: Receive,
        pending: list[Message],
        app_scope: anyio.CancelScope | None,
        loop: asyncio.AbstractEventLoop | None,
        host: tuple[asyncio.Task[Any], Any, int, int] | None,
    ) -> None:
        self.mw = mw
        self.ctx = ctx
        self.receive_server = receive
        self.pending: list[Message] | None = pending  # None once the app is done
        self.app_scope = app_scope  # (on trio: created in serve_in_task_group)
        # No scope entered (asyncio): the task, its anyio scope and its cancel count when
        # the app started, for the scope spliced in if the app must be cancelled.
        self.host = host
        self.loop = loop  # None: not asyncio, the watcher runs in a task group
        # The watcher's context, as if started now (it may start from the sweeper's timer).
        self.context = copy_context() if loop is not None else None
        self.watcher: asyncio.Task[None] | None = None
        self.watch_done = False
        self.disconnected: anyio.Event | None = None  # created only if the app waits for it
        self.reason: str | None = None
        self.answers = ctx is None  # ends a request whose client left (see wrap_send)
        # (send_server, sent and response_done: set by wrap_send, without a context layer,
        # with a time limit, or chained)

    def _done(self) -> bool:
        """Has the app sent the whole response?"""
        ctx = self.ctx
        return ctx.response_complete if ctx is not None else self.response_done

    def start_watcher(self) -> None:
        """Start watching for a disconnect now (asyncio; once; never after the app ended)."""
        if self.watcher is None and self.pending is not None and self.loop is not None:
            if self.context is not None:
                self.watcher = self.context.run(self.loop.create_task, self._watch())
            else:
                self.watcher = self.loop.create_task(self._watch())

    async def stop_watcher(self) -> None:
        """End the watcher (asyncio) before the request returns."""
        watcher = self.watcher
        if watcher is not None and not watcher.done():
            if self._done() and not self.watch_done:
                # An ASGI server answers receive() with http.disconnect once the
                # response is complete: let the watcher end by itself (cheaper).
                await asyncio.sleep(0)
            if not watcher.done():
                watcher.cancel()
                await asyncio.wait((watcher,))

    async def serve_in_task_group(
        self, app: ASGIApp, scope: Scope, send: Send, limit: float | None
    ) -> bool:
        """Call the app beside its watcher, in a task group (trio); did the app return?"""
        self.app_scope = app_scope = anyio.CancelScope()
        if limit is not None:
            app_scope.deadline = anyio.current_time() + limit
            if self.ctx is not None:
                self.ctx.state[LIMIT_SCOPE] = app_scope
        returned = False
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            try:
                with app_scope:
                    await app(scope, self.receive, send)
                    returned = True
            except Exception as exc:  # re-raised below, outside the task group, unwrapped
                error = exc
            self.pending = None
            if self._done() and not self.watch_done:
                await anyio.lowlevel.checkpoint()  # see stop_watcher
            if not self.watch_done:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return returned

    async def receive(self) -> Message:
        """The app's ``receive``: the body, then ``http.disconnect`` when the client goes."""
        pending = self.pending
        if pending:
            return pending.pop(0)
        if pending is not None and not self.watch_done:
            if self.disconnected is None:
                self.disconnected = anyio.Event()
            if self.watcher is None:  # the app waits for the client (asyncio): watch now
                self.start_watcher()
            await self.disconnected.wait()
        return {"type": "http.disconnect"}

    def wrap_send(self, send: Send, answers: bool = False) -> Send:
        """Our own ``send``, without a context layer (nothing records the response's end),
        with a time limit (lifted once the response is complete), or chained (``answers``:
        a request whose client left is ended here, not by the context layer, since an
        ``@app.middleware`` function between the two needs a response from us)."""
        self.send_server = send
        if answers:
            self.answers = True
        self.sent = False
        self.response_done = False
        return self.send

    async def send(self, message: Message) -> None:
        """The app's ``send``: notes the end of the response, which ends the time limit."""
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_done = True
            await self.send_server(message)
            # The limit bounds producing the response: what the app runs after it (Starlette's
            # background tasks, in the same call) must not be cut off unseen at the deadline.
            if self.app_scope is not None:
                self.app_scope.deadline = math.inf
            return
        self.sent = True
        await self.send_server(message)

    async def _watch(self) -> None:
        try:
            while True:
                message = await self.receive_server()
                if message["type"] == "http.disconnect":
                    break
                # Anything else after the body is unexpected; never spin on a server that
                # keeps answering at once: let the endpoint (and its deadline) run.
                await anyio.sleep(0.01)
        except Exception:  # a server whose receive fails: stop watching, keep serving
            logger.exception("receive() failed while watching for a disconnect")
            return
        finally:
            self.watch_done = True
            if self.disconnected is not None:
                self.disconnected.set()
        ctx = self.ctx
        if self._done():  # the server reports the end of a finished response
            if ctx is not None:  # (the context layer's receive took it for a disconnect)
                ctx.disconnected = False
            return
        if ctx is not None:
            ctx.disconnected = True
        if not self.mw.cancel_on_disconnect or (
            ctx is not None and ctx.state.get(CANCEL_ON_DISCONNECT) is False
        ):
            return
        self.reason = "disconnect"
        if ctx is not None:
            ctx.state[STATE_KEY] = {"reason": "disconnect", "at": time.perf_counter()}
            # Named now, not after the app unwound: the usage layer settles on its way out
            # (without a reason, an abandoned request that reported no usage had no row).
            if ctx.raw_finish_reason is None:
                ctx.raw_finish_reason = "cancelled"
        self.cancel_app()

    def cancel_app(self) -> None:
        """Cancel the app's scope (spliced in now if there is none yet)."""
        if self.pending is None:  # the app is done
            return
        if self.app_scope is None and self.host is not None:
            try:
                self.app_scope = _splice(*self.host)
            except Exception:  # (never seen with the checked anyio) not silently in a task
                logger.exception("could not cancel the request: splicing a scope failed")
                return
        if self.app_scope is not None:
            self.app_scope.cancel()

    async def after_cancel(self, limit: float | None) -> None:
        """The app was cancelled (a disconnect or its deadline): clean up, then a 504, or
        without a context layer, for a client gone before any response, an empty 499."""
        if self.reason is None:
            self.reason = "timeout"
        await self._run_callbacks()
        if self.answers and self.reason == "disconnect":
            # Alone or chained, what is right outside may not be the context layer, which
            # would end the request: without a response an app's @app.middleware("http")
            # function around this layer raises "No response returned." (a traceback and a
            # 500 in the server log). The context layer sends no second one, and takes
            # this one for none (its send notes that it went out, not its status).
            if not self.sent and not self.response_done:
                await end_abandoned(self.send_server, None)
            return
        if self.reason == "timeout" and not self._done():
            if self.ctx is not None:
                # A started event stream not our own: ended by an error event if what it
                # sent so far ends at an event boundary, else aborted (see _stream_cut);
                # set here to write within this layer's cleanup_timeout.
                stream_writer(self.ctx, self.mw.cleanup_timeout)
            raise Timeout(
                f"The request did not complete within {limit:g} s.",
                extra={"timeout_seconds": limit},
            )

    async def _run_callbacks(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        ctx.state.setdefault(STATE_KEY, {"reason": self.reason, "at": time.perf_counter()})
        if ctx.raw_finish_reason is None:
            ctx.raw_finish_reason = "cancelled" if self.reason == "disconnect" else "timeout"
        callbacks: list[Callable[[], Any]] = ctx.state.pop(_CALLBACKS, [])
        if not callbacks:
            return
        with cleanup_scope(self.mw.cleanup_timeout) as scope:
            for callback in callbacks:
                try:
                    if is_async_callable(callback):
                        await callback()
                    else:
                        result = callback()
                        if isinstance(result, Awaitable):
                            await result
                except Exception:
                    logger.exception("cancellation cleanup callback failed")
        if scope.cancelled_caught:
            logger.warning("cancellation cleanup exceeded %ss", self.mw.cleanup_timeout)
