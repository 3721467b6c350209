"""The idempotency lifecycle shared by the middleware and the decorator.

``begin`` looks the key up and decides: pass through, answer (replay or a typed error), or
run under a fresh lease. ``run`` then calls the app with a recording ``send`` while a
heartbeat extends the lease; the recording completes the record on the last body message
(before forwarding it, so an answer the client never received is still kept for its retry;
a stream's once the app returned without raising) or releases the key when the response is
not storable, too large, never ended or was cut.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from aimiddleware._asgi import send_problem
from aimiddleware.context import RequestContext
from aimiddleware.errors import (
    AIError,
    Conflict,
    IdempotencyKeyReused,
    InvalidRequest,
    StoreUnavailable,
)
from aimiddleware.idempotency.config import IdempotencyConfig
from aimiddleware.idempotency.fingerprint import Fingerprinter
from aimiddleware.idempotency.key import find_key
from aimiddleware.idempotency.later import LaterWrites
from aimiddleware.idempotency.memory import MemoryIdempotencyStore
from aimiddleware.idempotency.models import Claimed, Completed, LiveStream
from aimiddleware.idempotency.recorder import Recording
from aimiddleware.idempotency.redis import RedisIdempotencyStore
from aimiddleware.idempotency.replay import follow, replay
from aimiddleware.idempotency.store import IdempotencyStore, StreamingStore
from aimiddleware.storage import Storage
from aimiddleware.types import Send

__all__ = ["Begin", "IdempotencyEngine", "Lease", "answer"]

T = TypeVar("T")

logger = logging.getLogger("aimiddleware.idempotency")


def _never() -> bool:
    """A heartbeat's ``done`` when nothing ends the lease before the call does."""
    return False


@dataclass(frozen=True)
class Lease:
    key: str
    owner: str
    fingerprint: str


@dataclass(frozen=True)
class Begin:
    """What to do with a request: exactly one field is set, or none (= pass through)."""

    lease: Lease | None = None
    replay: Completed | None = None
    error: AIError | None = None
    follow: tuple[str, LiveStream] | None = None  # (record key, stream so far)
    unstored: bool = False  # passing through only because the store is down (fail open)


PASS = Begin()

# ``ctx.state`` key: the record key this request holds a lease on. A second layer on the same
# request (the decorator under the middleware) passes through instead of finding that lease
# and answering 409 (or 422, its secret being another) to every keyed request.
CLAIMED = "idempotency.claimed"


class IdempotencyEngine:
    def __init__(
        self,
        config: IdempotencyConfig,
        storage: Storage | str = "memory://",
        store: IdempotencyStore | None = None,
    ) -> None:
        self.config = config
        self.storage = Storage.coerce(storage)
        if store is None:
            store = (
                MemoryIdempotencyStore(max_bytes=config.memory_max_bytes)
                if self.storage.is_memory
                else RedisIdempotencyStore(self.storage)
            )
        self.store = store
        self.streaming: StreamingStore | None = None
        if config.follow_streams:
            if not isinstance(store, StreamingStore):
                raise ValueError("follow_streams needs a store implementing StreamingStore")
            self.streaming = store
        self.fingerprint = Fingerprinter(config.secret)
        self.header = config.header.lower().encode("latin-1")
        # Records the store did not take when their response ended (written once it answers).
        self.later = LaterWrites(self)

    def applies(self, method: str) -> bool:
        return method.upper() in self.config.methods

    def record_key(self, principal: str, method: str, path: str, key: str) -> str:
        digest = hashlib.sha256(f"{method}\0{path}\0{key}".encode()).hexdigest()[:40]
        return self.storage.key("idem", principal, digest)

    async def begin(
        self,
        ctx: RequestContext,
        headers: list[tuple[bytes, bytes]],
        query_string: bytes,
        required: bool | None = None,
    ) -> Begin:
        try:
            key = find_key(headers, self.header)
        except AIError as err:
            return Begin(error=err)
        if key is None:
            if self.config.required if required is None else required:
                return Begin(error=_missing(self.config.header))
            return PASS
        path = ctx.path
        fingerprint = self.fingerprint(
            ctx.method, path, query_string, ctx.body, ctx.api_version or ""
        )
        record_key = self.record_key(ctx.principal, ctx.method, path, key)
        if ctx.state.get(CLAIMED) == record_key:
            return PASS  # an outer layer runs this request under its lease and records it
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + (
            self.config.wait_seconds if self.config.on_conflict == "wait" else 0.0
        )
        while True:
            try:
                found = await self.store.claim(
                    record_key, fingerprint, owner, self.config.lease_seconds
                )
            except StoreUnavailable as err:
                if self.config.on_store_error == "open":
                    logger.warning("idempotency store down; serving without it (fail open)")
                    return Begin(unstored=True)
                return Begin(error=err)
            if isinstance(found, Claimed):
                ctx.state[CLAIMED] = record_key
                return Begin(lease=Lease(record_key, owner, fingerprint))
            if found.fingerprint != fingerprint and not (
                # a record written before fingerprints carried the API version (an upgrade,
                # or an older worker during a rolling deploy): the same request
                ctx.api_version
                and found.fingerprint
                == self.fingerprint(ctx.method, path, query_string, ctx.body)
            ):
                return Begin(error=IdempotencyKeyReused(param=self.config.header))
            if isinstance(found, Completed):
                return Begin(replay=found)
            if self.streaming is not None:
                try:
                    live = await self.streaming.stream_read(record_key, 0)
                except StoreUnavailable as err:
                    return Begin(error=err)
                if isinstance(live, LiveStream):
                    return Begin(follow=(record_key, live))
                if isinstance(live, Completed):
                    continue  # finished meanwhile: the claim above replays it
            if time.monotonic() >= deadline:
                return Begin(error=_in_flight())
            await anyio.sleep(self.config.poll_interval)

    def storable(self, status: int) -> bool:
        if status >= 500:
            return self.config.store_server_errors
        return status not in self.config.unstored_statuses

    async def run(self, lease: Lease, call: Callable[[Send], Awaitable[None]], send: Send) -> None:
        """Run ``call(recording_send)`` under ``lease``; release it unless completed."""
        recording = Recording(self, lease, send)
        try:
            # (the record completed, the app may still run: background tasks; nothing to renew)
            await self._with_heartbeat(lease, lambda: call(recording.send), lambda: recording.done)
            await recording.returned()
        finally:
            if not recording.done:
                with anyio.CancelScope(shield=True):
                    await recording.close()

    async def call_leased(self, lease: Lease, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` while the lease is kept alive; an exception releases the key."""
        try:
            return await self._with_heartbeat(lease, call)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release(lease)
            raise

    async def _with_heartbeat(
        self, lease: Lease, call: Callable[[], Awaitable[T]], done: Callable[[], bool] = _never
    ) -> T:
        """``await call()`` while the lease is kept alive, until ``done()`` (the record is
        completed: no lease is left to keep).

        Nothing runs for a request that ends within one heartbeat interval (the lease then
        has two thirds of its life left, by default): on asyncio a timer is armed and, only
        if it fires, a task starts renewing the lease every interval until the call ends.
        Other event loops (trio) run the renewing task in a task group from the start.
        """
        loop = _asyncio_loop()
        if loop is None:
            return await self._with_heartbeat_task(lease, call, done)
        keeper = _LazyHeartbeat(self, lease, loop, done)
        try:
            return await call()
        finally:
            await keeper.stop()

    async def _with_heartbeat_task(
        self, lease: Lease, call: Callable[[], Awaitable[T]], done: Callable[[], bool]
    ) -> T:
        error: Exception | None = None
        result: T | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat, lease, done)
            try:
                result = await call()
            except Exception as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    async def _heartbeat(
        self, lease: Lease, done: Callable[[], bool], *, wait_first: bool = True
    ) -> None:
        """Extend the lease every ``heartbeat_interval`` while the request runs, until
        ``done()``."""
        interval = self.config.heartbeat_interval
        if not wait_first and (done() or not await self._beat(lease)):
            return
        while True:
            await anyio.sleep(interval)
            if done() or not await self._beat(lease):
                return

    async def _beat(self, lease: Lease) -> bool:
        """One renewal; ``False`` once the lease is lost (then renewing stops)."""
        try:
            kept = await self.store.heartbeat(lease.key, lease.owner, self.config.lease_seconds)
        except Exception:  # the store may be down for a moment: try again next beat
            logger.warning("idempotency heartbeat failed", exc_info=True)
            return True
        if not kept:
            logger.warning("idempotency lease lost while the request was running")
        return kept

    async def follow(
        self, key: str, live: LiveStream, send: Send,
        accept: Iterable[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send another request's event stream from its start while it is going out
        (``accept``: the request's headers, see :func:`replay`)."""
        if self.streaming is None:
            raise RuntimeError("follow() needs follow_streams=True")
        await follow(self.streaming, key, live, send, self.config.poll_interval, accept)

    async def release(self, lease: Lease) -> None:
        try:
            await self.store.release(lease.key, lease.owner)
        except Exception:
            logger.warning("could not release an idempotency key; it frees itself after "
                           "the lease", exc_info=True)


def _missing(header: str) -> AIError:
    return InvalidRequest(f"This endpoint requires an {header} header.", param=header)


def _in_flight() -> Conflict:
    return Conflict(
        "A request with this Idempotency-Key is still in progress; retry after a moment.",
        retry_after=1,
    )


async def answer(
    begin: Begin, send: Send, request_id: str | None, type_base: str,
    accept: Iterable[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send the answer ``begin`` decided on (a replay or a typed error). ``accept``: the
    request's headers (a replay is decoded from a coding they do not accept)."""
    if begin.replay is not None:
        await replay(begin.replay, send, accept)
    elif begin.error is not None:
        await send_problem(send, begin.error, request_id, type_base=type_base)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, if the current task is an asyncio task (not trio's)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    # trio in guest mode on an asyncio host: a loop runs, but this is no asyncio task
    return loop if asyncio.current_task(loop) is not None else None


class _LazyHeartbeat:
    """A timer that starts renewing a lease only if the request outlives one interval.

    Owned by one ``_with_heartbeat`` call, which always ``stop()``s it: the timer is
    cancelled, and a renewing task (if the timer fired) is cancelled and awaited, so no
    renewal ever outlives the request.
    """

    __slots__ = ("done", "engine", "lease", "loop", "task", "timer")

    def __init__(
        self, engine: IdempotencyEngine, lease: Lease, loop: asyncio.AbstractEventLoop,
        done: Callable[[], bool],
    ) -> None:
        self.engine = engine
        self.lease = lease
        self.done = done
        self.loop = loop
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = loop.call_later(
            engine.config.heartbeat_interval, self._fire
        )

    def _fire(self) -> None:
        self.timer = None
        self.task = self.loop.create_task(
            self.engine._heartbeat(self.lease, self.done, wait_first=False)
        )

    async def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((task,))
