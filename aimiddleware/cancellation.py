"""``CancellationMiddleware``: a client that goes away cancels the work; per-route time limits.

Uvicorn never cancels an app task when the client disconnects, and
``Request.is_disconnected()`` is unreliable behind middleware, so a plain endpoint keeps
calling the model for nobody. This layer reads the request body (already cached by the
context layer, so this costs nothing), then owns ``receive``: one watcher waits for
``http.disconnect`` and cancels the endpoint through an anyio cancel scope, streaming or
not. The app's own ``receive`` calls get the body and then the disconnect, as usual.

Timeout tiers: ``timeouts`` maps path patterns (``fnmatch`` globs, first match wins) to
seconds, or ``None`` for no limit (jobs); ``default_timeout`` covers the rest. A request
over its limit ends in :class:`~aimiddleware.errors.Timeout` (504), or, when an event
stream has already started, an error event in the stream's dialect (through
``ErrorMiddleware`` and the context's ``stream_error_writer``).

Cleanup: awaits in ``finally`` blocks inside a cancelled scope are cancelled again (anyio
cancellation is level-triggered). Release resources under :func:`cleanup_scope` (shielded,
with a deadline), or register them with :func:`on_cancel`: this layer runs them shielded,
with a deadline, after a disconnect or a timeout.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from aimiddleware._asgi import is_async_callable
from aimiddleware.context import SCOPE_KEY, RequestContext, current
from aimiddleware.errors import Timeout
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CANCEL_ON_DISCONNECT",
    "CancellationConfig",
    "CancellationMiddleware",
    "cleanup_scope",
    "on_cancel",
]

logger = logging.getLogger("aimiddleware")

CANCEL_ON_DISCONNECT = "cancel_on_disconnect"
"""``ctx.state`` key: set to ``False`` (as a resumable event stream does) to keep running
after the client leaves; the time limit still applies."""
_CALLBACKS = "cancellation.callbacks"
STATE_KEY = "cancellation"


def cleanup_scope(seconds: float = 5.0) -> anyio.CancelScope:
    """A shielded scope with a deadline, for cleanup that must run after a cancellation."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + seconds)


def on_cancel(callback: Callable[[], Any], ctx: RequestContext | None = None) -> None:
    """Run ``callback`` (sync or async) if this request is cancelled or times out."""
    ctx = ctx or current()
    ctx.state.setdefault(_CALLBACKS, []).append(callback)


TimeoutTiers = Mapping[str, float | None] | Iterable[tuple[str, float | None]]


@dataclass(frozen=True)
class CancellationConfig:
    """``install()`` options for :class:`CancellationMiddleware` (same names)."""

    timeouts: TimeoutTiers = field(default_factory=dict)
    default_timeout: float | None = None
    cancel_on_disconnect: bool = True
    cleanup_timeout: float = 5.0


class CancellationMiddleware:
    """Cancel the endpoint when the client disconnects; enforce per-route time limits."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeouts: TimeoutTiers = (),
        default_timeout: float | None = None,
        cancel_on_disconnect: bool = True,
        cleanup_timeout: float = 5.0,
    ) -> None:
        pairs = list(timeouts.items()) if isinstance(timeouts, Mapping) else list(timeouts)
        self.tiers: list[tuple[re.Pattern[str], float | None]] = []
        for pattern, seconds in pairs:
            if not isinstance(pattern, str) or not pattern.startswith(("/", "*")):
                raise ValueError(f"timeout pattern must be a path glob, got {pattern!r}")
            self.tiers.append((re.compile(fnmatch.translate(pattern)), _seconds(seconds)))
        self.default_timeout = _seconds(default_timeout)
        if not cleanup_timeout > 0:
            raise ValueError("cleanup_timeout must be > 0 seconds")
        self.app = app
        self.cancel_on_disconnect = cancel_on_disconnect
        self.cleanup_timeout = cleanup_timeout

    def timeout_for(self, path: str) -> float | None:
        for regex, seconds in self.tiers:
            if regex.match(path):
                return seconds
        return self.default_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = self.timeout_for(scope["path"])
        if timeout is None and not self.cancel_on_disconnect:
            await self.app(scope, receive, send)
            return
        ctx = scope.get("state", {}).get(SCOPE_KEY)
        await _Call(self, scope, receive, send, ctx, timeout).run()


def _seconds(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError("timeouts must be > 0 seconds or None")
    return value


class _Call:
    """One request under watch."""

    def __init__(
        self,
        mw: CancellationMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext | None,
        timeout: float | None,
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.receive = receive
        self.send = send
        self.ctx = ctx
        self.timeout = timeout
        self.pending: list[Message] = []
        self.disconnected: anyio.Event | None = None  # created only if the app waits for it
        self.response_done = False
        self.watch_done = False
        self.app_returned = False
        self.reason: str | None = None
        self.app_scope = anyio.CancelScope()

    async def run(self) -> None:
        while True:  # the body (a replay of the context layer's cache when it is outside)
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if self.ctx is not None:
                    self.ctx.disconnected = True
                return
            self.pending.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if self.timeout is not None:
            self.app_scope.deadline = anyio.current_time() + self.timeout
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio): a task group
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                error = await self._call_app()
                if self.response_done and not self.watch_done:
                    await anyio.lowlevel.checkpoint()  # see below
                if not self.watch_done:
                    tg.cancel_scope.cancel()
        else:
            # On asyncio a plain task, always finished or cancelled and awaited before we
            # return, so still structured: an anyio task group here measured ~35 µs per
            # request against ~12 µs for this, paid by every request.
            watcher = loop.create_task(self._watch())
            try:
                error = await self._call_app()
                if self.response_done and not self.watch_done:
                    # An ASGI server answers receive() with http.disconnect once the
                    # response is complete: let the watcher end by itself (cheaper).
                    await asyncio.sleep(0)
            finally:
                if not watcher.done():
                    watcher.cancel()
                    await asyncio.wait((watcher,))
        if error is not None:
            raise error
        if self.app_returned:
            return
        if self.reason is None:
            self.reason = "timeout"
        await self._after_cancel()
        if self.reason == "timeout" and not self.response_done:
            raise Timeout(
                f"The request did not complete within {self.timeout:g} s.",
                extra={"timeout_seconds": self.timeout},
            )

    async def _call_app(self) -> Exception | None:
        try:
            with self.app_scope:
                await self.mw.app(self.scope, self._receive, self._send)
                self.app_returned = True
        except Exception as exc:  # re-raised by run(), outside any task group, unwrapped
            return exc
        return None

    async def _receive(self) -> Message:
        if self.pending:
            return self.pending.pop(0)
        if not self.watch_done:
            if self.disconnected is None:
                self.disconnected = anyio.Event()
            await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_done = True
        await self.send(message)

    async def _watch(self) -> None:
        try:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:  # a server whose receive fails: stop watching, keep serving
            logger.exception("receive() failed while watching for a disconnect")
            return
        finally:
            self.watch_done = True
            if self.disconnected is not None:
                self.disconnected.set()
        ctx = self.ctx
        if self.response_done:  # the server reports the end of a finished response
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
        self.app_scope.cancel()

    async def _after_cancel(self) -> None:
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
