"""The idempotency lifecycle shared by the middleware and the decorator.

``begin`` looks the key up and decides: pass through, answer (replay or a typed error), or
run under a fresh lease. ``run`` then calls the app with a recording ``send`` while a
heartbeat extends the lease; the recording completes the record on the last body message
(before forwarding it, so an answer the client never received is still kept for its retry)
or releases the key when the response is not storable, too large, or never ended.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
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
        fingerprint = self.fingerprint(ctx.method, path, query_string, ctx.body)
        record_key = self.record_key(ctx.principal, ctx.method, path, key)
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
                return Begin(lease=Lease(record_key, owner, fingerprint))
            if found.fingerprint != fingerprint:
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
            await self._with_heartbeat(lease, lambda: call(recording.send))
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

    async def _with_heartbeat(self, lease: Lease, call: Callable[[], Awaitable[T]]) -> T:
        error: Exception | None = None
        result: T | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat, lease)
            try:
                result = await call()
            except Exception as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    async def _heartbeat(self, lease: Lease) -> None:
        """Extend the lease every ``heartbeat_interval`` while the request runs."""
        interval = self.config.heartbeat_interval
        while True:
            await anyio.sleep(interval)
            try:
                kept = await self.store.heartbeat(lease.key, lease.owner, self.config.lease_seconds)
                if not kept:
                    logger.warning("idempotency lease lost while the request was running")
                    return
            except Exception:  # the store may be down for a moment: try again next beat
                logger.warning("idempotency heartbeat failed", exc_info=True)

    async def follow(self, key: str, live: LiveStream, send: Send) -> None:
        """Send another request's event stream from its start while it is going out."""
        if self.streaming is None:
            raise RuntimeError("follow() needs follow_streams=True")
        await follow(self.streaming, key, live, send, self.config.poll_interval)

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


async def answer(begin: Begin, send: Send, request_id: str | None, type_base: str) -> None:
    """Send the answer ``begin`` decided on (a replay or a typed error)."""
    if begin.replay is not None:
        await replay(begin.replay, send)
    elif begin.error is not None:
        await send_problem(send, begin.error, request_id, type_base=type_base)
