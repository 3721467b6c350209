"""``CancellationMiddleware``: a client that goes away cancels the work; per-route time limits.

Uvicorn never cancels an app task when the client disconnects, and
``Request.is_disconnected()`` is unreliable behind middleware, so a plain endpoint keeps
calling the model for nobody. This layer reads the request body (already cached by the
context layer, so this costs nothing), then owns ``receive``: one watcher waits for
``http.disconnect`` and cancels the endpoint through an anyio cancel scope, streaming or
not. The app's own ``receive`` calls get the body and then the disconnect, as usual.
On asyncio the watcher starts only once the endpoint has run for ``watch_after`` (25 ms
by default, at most 50 ms; one shared timer per event loop), or at once if the endpoint
itself waits on ``receive()``: a fast request pays for no task, and a client that left
earlier is seen the moment the watcher starts (the server answers ``http.disconnect`` at
once), so the endpoint is still cancelled well within 100 ms. On trio it starts at once.
On asyncio (3.11+) a request without a time limit enters no cancel scope either: the
scope is spliced in around the running endpoint, as if entered when it started, only if
it must be cancelled (this relies on anyio's asyncio internals, checked at import, in
``aimiddleware._scope_splice``; any other case enters the scope per request). The
per-request part (the app's ``receive``, the watcher, what follows a cancellation) and the
loop's timer are in ``aimiddleware._cancel_watch``.

Timeout tiers: ``timeouts`` maps path patterns (``fnmatch`` globs, first match wins) to
seconds, or ``None`` for no limit (jobs); ``default_timeout`` covers the rest. A request
over its limit ends in :class:`~aimiddleware.errors.Timeout` (504), or, when an event
stream has already started, an error event in the stream's dialect (through
``ErrorMiddleware`` and the context's ``stream_error_writer``; an event stream not made by
``EventStreamResponse`` gets one only if what it sent ends at an event boundary, else it
is aborted: see ``aimiddleware._stream_cut``). The limit bounds the response: once its
last body message is sent, what the app still runs (Starlette's background tasks) is not
cut off.

Cleanup: awaits in ``finally`` blocks inside a cancelled scope are cancelled again (anyio
cancellation is level-triggered). Release resources under :func:`cleanup_scope` (shielded,
with a deadline), or register them with :func:`on_cancel`: this layer runs them shielded,
with a deadline, after a disconnect or a timeout.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import threading
from asyncio import current_task, get_running_loop
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from aimiddleware._asgi import route_path
from aimiddleware._cancel_watch import (
    _CALLBACKS,
    CANCEL_ON_DISCONNECT,
    LIMIT_SCOPE,
    _Call,
    _Sweeper,
    cleanup_scope,
)
from aimiddleware._cancel_watch import STATE_KEY as STATE_KEY
from aimiddleware._scope_splice import (
    _CAN_SPLICE,
    _SWALLOWS_NATIVE_CANCEL,
    _splice_order,
    _task_states,
)
from aimiddleware._stream_cut import SENT, SentWatch
from aimiddleware.context import SCOPE_KEY, RequestContext, current
from aimiddleware.context_middleware import end_abandoned
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CANCEL_ON_DISCONNECT",
    "CancellationConfig",
    "CancellationMiddleware",
    "cleanup_scope",
    "on_cancel",
]

DEADLINE = "cancellation.deadline"
"""``ctx.state`` key: when the request's time limit runs out (``anyio.current_time()``)."""


def on_cancel(callback: Callable[[], Any], ctx: RequestContext | None = None) -> None:
    """Run ``callback`` (sync or async) if this request is cancelled or times out."""
    ctx = ctx or current()
    ctx.state.setdefault(_CALLBACKS, []).append(callback)


TimeoutTiers = Mapping[str, float | None] | Iterable[tuple[str, float | None]]


DEFAULT_WATCH_AFTER = 0.025
"""Seconds before the disconnect watcher starts (asyncio): a request that is done by then
never pays for a task; a client that left earlier is seen as soon as it starts."""
_MAX_WATCH_AFTER = 0.05  # keeps "cancelled within 100 ms of the client going away" true
_PATH_CACHE_SIZE = 1024


@dataclass(frozen=True)
class CancellationConfig:
    """``install()`` options for :class:`CancellationMiddleware` (same names)."""

    timeouts: TimeoutTiers = field(default_factory=dict)
    default_timeout: float | None = None
    cancel_on_disconnect: bool = True
    cleanup_timeout: float = 5.0
    watch_after: float = DEFAULT_WATCH_AFTER
    splice_scopes: bool = True

    def __post_init__(self) -> None:
        # Checked here, not first when the middleware is built: Starlette builds it on the
        # first ASGI call, where a failing lifespan is taken for "lifespan unsupported".
        _tiers(self.timeouts, self.default_timeout, self.cleanup_timeout, self.watch_after)


class CancellationMiddleware:
    """Cancel the endpoint when the client disconnects; enforce per-route time limits.

    ``watch_after`` (seconds, 0 to 0.05): on asyncio the disconnect watcher starts only
    if the endpoint is still running after this long (at most a quarter more; or as soon
    as the endpoint itself waits on ``receive()``), so a fast request costs a dict entry
    instead of a task. A disconnect in the meantime is seen the moment the watcher starts.

    ``splice_scopes``: on asyncio (Python 3.11+, the anyio layout it was checked against), a
    request without a time limit enters no anyio cancel scope; one is spliced in around the
    app only if it must be cancelled (see ``aimiddleware._scope_splice``), which saves ~6 µs
    per request.
    ``False`` enters one per request, as with a time limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeouts: TimeoutTiers = (),
        default_timeout: float | None = None,
        cancel_on_disconnect: bool = True,
        cleanup_timeout: float = 5.0,
        watch_after: float = DEFAULT_WATCH_AFTER,
        splice_scopes: bool = True,
    ) -> None:
        self.tiers = _tiers(timeouts, default_timeout, cleanup_timeout, watch_after)
        self.default_timeout = default_timeout
        self.app = app
        self.cancel_on_disconnect = cancel_on_disconnect
        self.cleanup_timeout = cleanup_timeout
        self.watch_after = watch_after
        self.splice_scopes = splice_scopes and _CAN_SPLICE
        self._timeout_cache: dict[str, float | None] = {}  # path -> tier (bounded)
        self._asyncio_scope_cls: type[anyio.CancelScope] | None = None
        self._sweepers: dict[asyncio.AbstractEventLoop, _Sweeper] = {}  # one per loop
        self._sweepers_lock = threading.Lock()  # (for loops in several threads)
        self._last_sweeper: _Sweeper | None = None  # the last one used (one loop: always)

    def _sweeper(self, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        # (locked: loops in other threads add, drop and walk the dict meanwhile)
        with self._sweepers_lock:
            sweeper = self._sweepers.get(loop)
            if sweeper is None:
                if len(self._sweepers) > 8:  # loops closed with requests in flight (tests)
                    for old in [lp for lp in self._sweepers if lp.is_closed()]:
                        del self._sweepers[old]
                sweeper = self._sweepers[loop] = _Sweeper(loop, self.watch_after, self)
        self._last_sweeper = sweeper
        return sweeper

    def _retire(self, sweeper: _Sweeper) -> None:
        """Forget an idle sweeper (and so its loop, which may be closed next)."""
        with self._sweepers_lock:
            if self._sweepers.get(sweeper.loop) is sweeper:
                del self._sweepers[sweeper.loop]
        if self._last_sweeper is sweeper:
            self._last_sweeper = None

    def timeout_for(self, path: str) -> float | None:
        if not self.tiers:
            return self.default_timeout
        cache = self._timeout_cache
        try:
            return cache[path]
        except KeyError:
            pass
        found = self.default_timeout
        for regex, seconds in self.tiers:
            if regex.match(path):
                found = seconds
                break
        if len(cache) >= _PATH_CACHE_SIZE:  # paths with ids in them: keep it bounded
            cache.clear()
        cache[path] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = self.timeout_for(route_path(scope))
        if timeout is None and not self.cancel_on_disconnect:
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        ctx = state.get(SCOPE_KEY) if state is not None else None
        pending: list[Message] = []
        while True:  # the body (a replay of the context layer's cache when it is outside)
            message = await receive()
            if message["type"] == "http.disconnect":
                if ctx is not None:
                    ctx.disconnected = True
                # Ended here, with or without the context layer outside (see
                # _Call.wrap_send): a middleware function between them needs a response.
                await end_abandoned(send, None)
                return
            pending.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if timeout is not None and ctx is not None:  # (what goes out: see _stream_cut)
            send = ctx.state[SENT] = SentWatch(send)
        await self.serve(self.app, scope, receive, send, ctx, timeout, pending, answer=True)

    async def serve(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext | None,
        limit: float | None,
        pending: list[Message] | None = None,
        answer: bool = False,
    ) -> None:
        """Call ``app`` under watch (``limit``: seconds or None), its body already read:
        ``pending``, else ``ctx.body``. ``answer``: a request whose client left before any
        response is ended here with an empty 499 (as without a context layer), not left to
        the context layer outside (``StackMiddleware``, which is that layer, does not ask).

        ``receive`` is the server's, from here on this layer's alone. (``StackMiddleware``
        calls this directly, the context layer's body in hand.)
        """
        if pending is None:
            assert ctx is not None
            pending = [{"type": "http.request", "body": ctx.body, "more_body": False}]
        try:
            loop = get_running_loop()
        except RuntimeError:  # another anyio backend (trio): a task group, watching at once
            call = _Call(self, ctx, receive, pending, None, None, None)
            if ctx is None or limit is not None or answer:
                send = call.wrap_send(send, answer)
            if await call.serve_in_task_group(app, scope, send, limit):
                return
        else:
            # On asyncio the watcher is a plain task, started only if the app is still
            # running after ``watch_after`` (by the loop's sweeper), always finished or
            # cancelled and awaited before we return, so still structured. A task per
            # request measured ~12 µs (a task group ~35 µs), paid by every request; a
            # timer per request ~2 µs; the sweeper's dict entry ~0.1 µs.
            host = current_task() if limit is None and self.splice_scopes else None
            native: Any = None  # (the task whose own cancellation an old anyio may swallow)
            if host is not None:
                # No cancel scope entered (anyio's costs ~6 µs per request in the stack):
                # one is spliced in, as if entered now, only if the app must be cancelled.
                state = _task_states.get(host)
                base = state.cancel_scope if state is not None else None
                cancelling = host.cancelling()
                splice = (host, base, cancelling, next(_splice_order))
                call = _Call(self, ctx, receive, pending, None, loop, splice)
            else:
                # anyio's CancelScope() looks the backend up (sniffio) on every call:
                # build the asyncio backend's scope class directly, found once.
                scope_cls = self._asyncio_scope_cls
                if scope_cls is None:
                    scope_cls = self._asyncio_scope_cls = type(anyio.CancelScope())
                # (anyio's clock on asyncio is the loop's)
                if limit is None:
                    app_scope = scope_cls()
                else:
                    app_scope = scope_cls(deadline=loop.time() + limit)
                    if ctx is not None:  # (so what it cut can tell a timeout from a cancel)
                        ctx.state[DEADLINE] = app_scope.deadline
                        ctx.state[LIMIT_SCOPE] = app_scope  # (lifted once the response is out)
                call = _Call(self, ctx, receive, pending, app_scope, loop, None)
                if _SWALLOWS_NATIVE_CANCEL:
                    native = current_task()
                    at_enter = native.cancelling()
            sweeper = None
            if self.watch_after:
                # Inlined (no method calls): the one loop is the last one's.
                sweeper = self._last_sweeper
                if sweeper is None or sweeper.loop is not loop:
                    sweeper = self._sweeper(loop)
                sweeper.running[call] = loop.time() + self.watch_after
                if sweeper.handle is None:
                    sweeper.arm()
            else:
                call.start_watcher()
            if ctx is None or limit is not None or answer:
                send = call.wrap_send(send, answer)
            try:  # (the app is called in this frame: one coroutine less per request)
                if host is None:
                    with app_scope:
                        await app(scope, call.receive, send)
                        return  # the app returned: only the ``finally`` below is left
                    if native is not None and native.cancelling() > at_enter:
                        raise asyncio.CancelledError  # the task's own, swallowed with ours
                else:
                    try:
                        await app(scope, call.receive, send)
                    except BaseException as exc:
                        spliced = call.app_scope  # exited here, as a ``with`` would
                        if spliced is None or not spliced.__exit__(
                            type(exc), exc, exc.__traceback__
                        ):
                            raise
                    else:
                        if call.app_scope is not None:
                            call.app_scope.__exit__(None, None, None)
                        return
            finally:
                call.pending = None  # done: no watcher, no splice from now on
                if sweeper is not None:
                    sweeper.running.pop(call, None)
                if call.watcher is not None:
                    await call.stop_watcher()
        await call.after_cancel(limit)


def _tiers(
    timeouts: TimeoutTiers, default_timeout: float | None, cleanup_timeout: float,
    watch_after: float,
) -> list[tuple[re.Pattern[str], float | None]]:
    """The timeout tiers compiled, once the options are checked (ValueError)."""
    pairs = list(timeouts.items()) if isinstance(timeouts, Mapping) else list(timeouts)
    tiers: list[tuple[re.Pattern[str], float | None]] = []
    for pattern, seconds in pairs:
        if not isinstance(pattern, str) or not pattern.startswith(("/", "*")):
            raise ValueError(f"timeout pattern must be a path glob, got {pattern!r}")
        tiers.append((re.compile(fnmatch.translate(pattern)), _seconds(seconds)))
    _seconds(default_timeout)
    if not cleanup_timeout > 0:
        raise ValueError("cleanup_timeout must be > 0 seconds")
    if isinstance(watch_after, bool) or not 0 <= watch_after <= _MAX_WATCH_AFTER:
        raise ValueError(f"watch_after must be between 0 and {_MAX_WATCH_AFTER} seconds")
    return tiers


def _seconds(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError("timeouts must be > 0 seconds or None")
    return value
