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
it must be cancelled (this relies on anyio's asyncio internals, checked at import; any
other case enters the scope per request).

Timeout tiers: ``timeouts`` maps path patterns (``fnmatch`` globs, first match wins) to
seconds, or ``None`` for no limit (jobs); ``default_timeout`` covers the rest. A request
over its limit ends in :class:`~aimiddleware.errors.Timeout` (504), or, when an event
stream has already started, an error event in the stream's dialect (through
``ErrorMiddleware`` and the context's ``stream_error_writer``). The limit bounds the
response: once its last body message is sent, what the app still runs (Starlette's
background tasks) is not cut off.

Cleanup: awaits in ``finally`` blocks inside a cancelled scope are cancelled again (anyio
cancellation is level-triggered). Release resources under :func:`cleanup_scope` (shielded,
with a deadline), or register them with :func:`on_cancel`: this layer runs them shielded,
with a deadline, after a disconnect or a timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import fnmatch
import itertools
import logging
import math
import re
import sys
import time
from asyncio import current_task, get_running_loop
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import copy_context
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import anyio
import anyio.lowlevel

from aimiddleware._asgi import is_async_callable, route_path
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

# The exact layout _splice was written against (anyio 4.16): a scope with one more slot
# or a task state with one more field may hold state that ``__enter__`` sets and _splice
# would not, so any difference in either turns splicing off.
_SCOPE_SLOTS = frozenset(
    {"_active", "_cancel_called", "_cancel_handle", "_cancel_reason", "_cancelled_caught"}
    | {"_cancelling_at_enter", "_child_scopes", "_deadline", "_host_task", "_parent_scope"}
    | {"_pending_uncancellations", "_shield", "_tasks", "_timeout_handle"}
)
_STATE_SLOTS = frozenset({"__weakref__", "cancel_scope", "parent_id"})


def _splice_supported(scope_cls: type, state_cls: type, states: object) -> bool:
    """Can a scope of ``scope_cls`` be spliced in (see :func:`_splice`)?"""
    return (
        sys.version_info >= (3, 11)  # (Task.cancelling)
        and frozenset(getattr(scope_cls, "__slots__", ())) == _SCOPE_SLOTS
        and frozenset(getattr(state_cls, "__slots__", ())) == _STATE_SLOTS
        and isinstance(states, WeakKeyDictionary)
    )


try:  # anyio's asyncio scope internals, for a scope spliced in only when needed (below)
    from anyio._backends._asyncio import CancelScope as _AsyncioScope
    from anyio._backends._asyncio import TaskState as _TaskState
    from anyio._backends._asyncio import _task_states
except ImportError:  # another anyio: enter a scope per request
    _CAN_SPLICE = False
else:
    _CAN_SPLICE = _splice_supported(_AsyncioScope, _TaskState, _task_states)

    class _SplicedScope(_AsyncioScope):
        """A spliced scope, with the order its request started in (nested layers)."""

        __slots__ = ("order",)
        order: int


_splice_order = itertools.count()  # serve() start order, so nested layers splice in order

CANCEL_ON_DISCONNECT = "cancel_on_disconnect"
"""``ctx.state`` key: set to ``False`` (as a resumable event stream does) to keep running
after the client leaves; the time limit still applies."""
_CALLBACKS = "cancellation.callbacks"
STATE_KEY = "cancellation"
DEADLINE = "cancellation.deadline"
"""``ctx.state`` key: when the request's time limit runs out (``anyio.current_time()``)."""


def cleanup_scope(seconds: float = 5.0) -> anyio.CancelScope:
    """A shielded scope with a deadline, for cleanup that must run after a cancellation."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + seconds)


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


class CancellationMiddleware:
    """Cancel the endpoint when the client disconnects; enforce per-route time limits.

    ``watch_after`` (seconds, 0 to 0.05): on asyncio the disconnect watcher starts only
    if the endpoint is still running after this long (at most a quarter more; or as soon
    as the endpoint itself waits on ``receive()``), so a fast request costs a dict entry
    instead of a task. A disconnect in the meantime is seen the moment the watcher starts.

    ``splice_scopes``: on asyncio (Python 3.11+, the anyio layout it was checked against), a
    request without a time limit enters no anyio cancel scope; one is spliced in around the
    app only if it must be cancelled (see :func:`_splice`), which saves ~6 µs per request.
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
        pairs = list(timeouts.items()) if isinstance(timeouts, Mapping) else list(timeouts)
        self.tiers: list[tuple[re.Pattern[str], float | None]] = []
        for pattern, seconds in pairs:
            if not isinstance(pattern, str) or not pattern.startswith(("/", "*")):
                raise ValueError(f"timeout pattern must be a path glob, got {pattern!r}")
            self.tiers.append((re.compile(fnmatch.translate(pattern)), _seconds(seconds)))
        self.default_timeout = _seconds(default_timeout)
        if not cleanup_timeout > 0:
            raise ValueError("cleanup_timeout must be > 0 seconds")
        if isinstance(watch_after, bool) or not 0 <= watch_after <= _MAX_WATCH_AFTER:
            raise ValueError(f"watch_after must be between 0 and {_MAX_WATCH_AFTER} seconds")
        self.app = app
        self.cancel_on_disconnect = cancel_on_disconnect
        self.cleanup_timeout = cleanup_timeout
        self.watch_after = watch_after
        self.splice_scopes = splice_scopes and _CAN_SPLICE
        self._timeout_cache: dict[str, float | None] = {}  # path -> tier (bounded)
        self._asyncio_scope_cls: type[anyio.CancelScope] | None = None
        self._sweepers: dict[asyncio.AbstractEventLoop, _Sweeper] = {}  # one per loop
        self._last_sweeper: _Sweeper | None = None  # the last one used (one loop: always)

    def _sweeper(self, loop: asyncio.AbstractEventLoop) -> _Sweeper:
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
                return
            pending.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await self.serve(self.app, scope, receive, send, ctx, timeout, pending)

    async def serve(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext | None,
        limit: float | None,
        pending: list[Message] | None = None,
    ) -> None:
        """Call ``app`` under watch (``limit``: seconds or None), its body already read:
        ``pending``, else ``ctx.body``.

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
            if ctx is None or limit is not None:
                send = call.wrap_send(send)
            if await call.serve_in_task_group(app, scope, send, limit):
                return
        else:
            # On asyncio the watcher is a plain task, started only if the app is still
            # running after ``watch_after`` (by the loop's sweeper), always finished or
            # cancelled and awaited before we return, so still structured. A task per
            # request measured ~12 µs (a task group ~35 µs), paid by every request; a
            # timer per request ~2 µs; the sweeper's dict entry ~0.1 µs.
            host = current_task() if limit is None and self.splice_scopes else None
            if host is not None:
                # No cancel scope entered (anyio's costs ~6 µs per request in the stack):
                # one is spliced in, as if entered now, only if the app must be cancelled.
                state = _task_states.get(host)
                base = state.cancel_scope if state is not None else None
                cancelling = host.cancelling()  # type: ignore[attr-defined]
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
                call = _Call(self, ctx, receive, pending, app_scope, loop, None)
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
            if ctx is None or limit is not None:
                send = call.wrap_send(send)
            try:  # (the app is called in this frame: one coroutine less per request)
                if host is None:
                    with app_scope:
                        await app(scope, call.receive, send)
                        return  # the app returned: only the ``finally`` below is left
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


def _seconds(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError("timeouts must be > 0 seconds or None")
    return value


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
        # (send_server and response_done: set by wrap_send, without a context layer or
        # with a time limit)

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

    def wrap_send(self, send: Send) -> Send:
        """Our own ``send``, without a context layer (nothing records the response's end)
        or with a time limit (lifted once the response is complete)."""
        self.send_server = send
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
        """The app was cancelled (a disconnect or its deadline): clean up, then a 504."""
        if self.reason is None:
            self.reason = "timeout"
        await self._run_callbacks()
        if self.reason == "timeout" and not self._done():
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


def _splice(task: asyncio.Task[Any], base: Any, cancelling: int, order: int) -> anyio.CancelScope:
    """An anyio cancel scope around the running app, exactly as if ``with`` had entered it
    when the app started (in ``task``, inside ``base``, the task's scope then).

    What ``CancelScope.__enter__`` would have set then is set now: the scope is the parent
    of the app's outermost scope (or holds the task if the app is in none), so anyio
    itself delivers the cancellation, skips shielded scopes, keeps cancelling until the app
    leaves, and ``serve`` exits it as a ``with`` would. A request that is never cancelled
    (nearly all) pays for no scope at all.

    Another layer's spliced scope in the way is inside ours if its request started later
    (``order``), else ours is inside it: it stands for a scope entered before ours.
    """
    scope: Any = _SplicedScope()
    scope.order = order
    scope._host_task = task
    scope._cancelling_at_enter = cancelling
    scope._active = True
    state = _task_states.get(task)
    parent = base
    inner: Any = None  # the outermost scope the app entered (after ``order``), if any
    node: Any = state.cancel_scope if state is not None else None
    while node is not base:
        if isinstance(node, _SplicedScope) and node.order < order:
            parent = node  # an outer layer's: entered (as if) before ours
            break
        inner, node = node, node._parent_scope
    scope._parent_scope = parent
    if inner is None:  # the app is in no scope of its own: the task is in ours
        if state is None:
            _task_states[task] = _TaskState(None, scope)
        else:
            state.cancel_scope = scope
        scope._tasks.add(task)
        if parent is not None:
            parent._tasks.discard(task)
    else:  # the app's outermost scope moves into ours
        inner._parent_scope = scope
        scope._child_scopes.add(inner)
        if parent is not None:
            parent._child_scopes.discard(inner)
    if parent is not None:
        parent._child_scopes.add(scope)
    return scope  # type: ignore[no-any-return]
