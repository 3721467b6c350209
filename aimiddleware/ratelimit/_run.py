"""Run a call under an admission: keep its lease alive, reconcile and release in ``finally``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from aimiddleware.context import RequestContext
from aimiddleware.errors import AIError, StoreUnavailable
from aimiddleware.ratelimit.headers import merge_rate_headers
from aimiddleware.ratelimit.limiter import Admission, RateLimiter
from aimiddleware.types import Message

__all__ = [
    "add_headers", "failed_response", "is_last_body", "is_success", "run_admitted",
    "run_request", "send_then_settle", "settle", "settle_once", "settled_now",
]

logger = logging.getLogger("aimiddleware.ratelimit")

T = TypeVar("T")


async def run_admitted(
    limiter: RateLimiter,
    admission: Admission,
    ctx: RequestContext,
    call: Callable[[], Awaitable[T]],
    is_failure: Callable[[T], bool],
    hold: Callable[[T], bool] | None = None,
) -> T:
    """Await ``call()``; whatever happens (error, cancellation, disconnect), reconcile the
    reservation and release the concurrency lease under a shielded scope.

    A call that raises is a failure (refunded in full) unless its response had already
    started with a success status (a stream the client leaves, or that a timeout or error
    cuts short, was partly delivered) or the client went away: those are charged their
    usage, else their reservation.

    ``hold(result)`` True: the result is a response still to be sent (a stream); nothing is
    settled here, the caller sends it with :func:`send_then_settle`.

    A send wrapper that sees the response's last body go out settles then
    (:func:`settle_once`), before the call returns: see :func:`run_request`."""
    failed = True
    held = False
    try:
        if admission.lease is None or not limiter.refreshes:
            result = await call()
        else:
            result = await _with_refresh(limiter, admission, call)
        failed = is_failure(result)
        held = not failed and hold is not None and hold(result)
        return result
    except BaseException as exc:  # (a cancellation too: judged by the response, if any)
        failed = failed_response(ctx)
        if isinstance(exc, AIError):
            add_headers(exc, admission)
        raise
    finally:
        if not held:
            await settle_once(limiter, admission, ctx, failed)


async def send_then_settle(
    limiter: RateLimiter,
    admission: Admission,
    ctx: RequestContext,
    send: Callable[[], Awaitable[None]],
) -> None:
    """Await ``send()`` (a response that :func:`run_admitted` held) under the admission,
    judged by the response as a request is."""
    await run_admitted(limiter, admission, ctx, send, lambda _: failed_response(ctx))


async def run_request(
    limiter: RateLimiter,
    admission: Admission,
    ctx: RequestContext,
    call: Callable[..., Awaitable[Any]],
    *args: Any,
) -> None:
    """:func:`run_admitted` for an ASGI request, awaiting ``call(*args)``: a failure is a
    response status outside 2xx (or none). Without a lease to keep alive, the same steps
    inline (cheaper).

    The caller's send wrapper settles as soon as the response's last body message has gone
    out (:func:`is_last_body`, then :func:`settle_once`): an app may go on after its
    response (FastAPI runs its ``BackgroundTasks`` before it returns), and the request's
    concurrency slot and reservation must not wait for that. What the call then does is
    not charged; ``finally`` settles a request whose response never went out whole."""
    if admission.lease is not None and limiter.refreshes:
        await run_admitted(
            limiter, admission, ctx, lambda: call(*args), lambda _: failed_response(ctx)
        )
        return
    try:
        await call(*args)
    except AIError as err:
        add_headers(err, admission)
        raise
    finally:
        failed = failed_response(ctx)  # (raised or not: by the response, as in run_admitted)
        if not settled_now(limiter, admission, ctx, failed):
            await settle_once(limiter, admission, ctx, failed)


def is_last_body(message: Message) -> bool:
    """The message that completes a response: after it is sent, settle (``settle_once``)."""
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def settled_now(
    limiter: RateLimiter, admission: Admission, ctx: RequestContext, failed: bool
) -> bool:
    """:func:`settle_once` without a coroutine where none is needed: True when the admission
    is settled on return (it already was, or the in-process store settled it in a plain
    call that never raises); False: await :func:`settle_once`. Every request passes here."""
    if admission.done:
        return True
    if not limiter.finishes_now:
        return False
    admission.done = True  # (in-process: no lease refresher to stop)
    limiter.finish_now(admission, ctx, failed)
    return True


async def settle_once(
    limiter: RateLimiter, admission: Admission, ctx: RequestContext, failed: bool
) -> None:
    """Stop the lease refresher, then reconcile and release, unless that already happened:
    the response's end and the call's ``finally`` both call it, the first one settles."""
    if settled_now(limiter, admission, ctx, failed):
        return
    admission.done = True
    stop = admission.stop_refresh
    if stop is not None:  # (before the release: a refresh in flight would re-add the lease)
        admission.stop_refresh = None
        await stop()
    if not limiter.settled(admission, ctx, failed=failed):
        await settle(limiter, admission, ctx, failed)


def is_success(status: int) -> bool:
    """A response the caller is charged for: a 2xx. An error or a redirect (such as a
    trailing-slash 307, which calls no model) is refunded."""
    return 200 <= status < 300


def failed_response(ctx: RequestContext) -> bool:
    """Refunded in full: a response that is not a success, or none at all unless the client
    went away while the app ran (a model call it chose to abandon is still a call)."""
    status = ctx.response_status
    if status is None:
        return not ctx.disconnected
    return not is_success(status)


def add_headers(err: AIError, admission: Admission) -> None:
    """Give an error raised under an admission the admission's rate-limit headers, merged
    with any it carries (an inner limiter's refusal: :func:`merge_rate_headers`)."""
    if admission.raw_headers:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in err.headers]
        err.headers[:] = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in merge_rate_headers(raw, admission.raw_headers)
        ]


async def settle(
    limiter: RateLimiter, admission: Admission, ctx: RequestContext, failed: bool
) -> None:
    """Reconcile and release (call it in a ``finally`` when ``limiter.settled`` is False)."""
    if limiter.refreshes:  # a shared store: I/O that a cancellation must not cut short
        with anyio.CancelScope(shield=True):
            await _finish(limiter, admission, ctx, failed)
    else:  # in-process: completes without a checkpoint, so it cannot be interrupted
        await _finish(limiter, admission, ctx, failed)


async def _finish(
    limiter: RateLimiter, admission: Admission, ctx: RequestContext, failed: bool
) -> None:
    try:
        await limiter.finish(admission, ctx, failed=failed)
    except Exception:  # never let bookkeeping hide the response or the real error
        logger.exception("rate-limit reconciliation failed")


async def _with_refresh(
    limiter: RateLimiter, admission: Admission, call: Callable[[], Awaitable[T]]
) -> T:
    """Await ``call()`` while its lease is refreshed every third of the TTL."""
    interval = max(limiter.lease_ttl_ms / 3000, 0.05)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio): a task group, from the start
        return await _in_task_group(limiter, admission, call, interval)
    # asyncio: the refresher is a plain task started by a timer only if the call still runs
    # after one interval, always cancelled and awaited before we return, so still
    # structured. Most calls end first and pay for the timer (~2 µs), not for a task group
    # (~35 µs measured, paid by every request that holds a lease).
    started: list[asyncio.Task[None]] = []

    def start() -> None:  # (in a copy of the request's context, as call_later runs it)
        started.append(loop.create_task(_refresher(limiter, admission, interval)))

    async def stop() -> None:
        timer.cancel()
        if started:
            started[0].cancel()
            with anyio.CancelScope(shield=True):  # (also when the call was cancelled)
                await asyncio.wait(started)

    timer = loop.call_later(interval, start)
    admission.stop_refresh = stop  # (settle_once stops it when the response went out)
    try:
        return await call()
    finally:
        if admission.stop_refresh is stop:
            admission.stop_refresh = None
            await stop()


async def _refresher(limiter: RateLimiter, admission: Admission, interval: float) -> None:
    """Refresh the lease now, then every ``interval`` seconds, until cancelled."""
    while True:
        try:
            await limiter.refresh(admission)
        except StoreUnavailable:
            logger.warning("could not refresh a rate-limit lease: store unavailable")
        except Exception:  # (a store error that is not an outage: out of memory, read
            # only...) bookkeeping must never cut the call short
            logger.exception("could not refresh a rate-limit lease")
        await anyio.sleep(interval)


async def _in_task_group(
    limiter: RateLimiter, admission: Admission, call: Callable[[], Awaitable[T]], interval: float
) -> T:
    scope = anyio.CancelScope()
    stopped = anyio.Event()

    async def refresher() -> None:
        with scope:
            await anyio.sleep(interval)
            await _refresher(limiter, admission, interval)
        stopped.set()

    async def stop() -> None:
        scope.cancel()
        with anyio.CancelScope(shield=True):
            await stopped.wait()

    box: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(refresher)
        admission.stop_refresh = stop  # (settle_once stops it when the response went out)
        try:
            box["result"] = await call()
        except Exception as exc:  # re-raised bare below, not inside an ExceptionGroup
            box["error"] = exc
        finally:
            if admission.stop_refresh is stop:
                admission.stop_refresh = None
            tg.cancel_scope.cancel()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]
