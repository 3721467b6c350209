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

from aimiddleware._asgi import get_header, send_problem
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
from aimiddleware.idempotency.models import Claimed, Completed, InFlight, LiveStream
from aimiddleware.idempotency.redis import RedisIdempotencyStore
from aimiddleware.idempotency.store import IdempotencyStore, StreamingStore
from aimiddleware.storage import Storage
from aimiddleware.types import Message, Send

__all__ = ["REPLAYED", "STORED", "Begin", "IdempotencyEngine", "Lease", "replay"]

T = TypeVar("T")

logger = logging.getLogger("aimiddleware.idempotency")

REPLAYED = (b"idempotent-replayed", b"true")
STORED = (b"idempotent-stored", b"false")


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
                return Begin(error=_in_flight(found))
            await anyio.sleep(self.config.poll_interval)

    def storable(self, status: int) -> bool:
        if status >= 500:
            return self.config.store_server_errors
        return status not in self.config.unstored_statuses

    async def run(self, lease: Lease, call: Callable[[Send], Awaitable[None]], send: Send) -> None:
        """Run ``call(recording_send)`` under ``lease``; release it unless completed."""
        recording = _Recording(self, lease, send)
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
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in live.headers]
        await send({"type": "http.response.start", "status": live.status,
                    "headers": [*headers, REPLAYED]})
        offset = 0
        current: LiveStream | InFlight | Completed | None = live
        while True:
            if isinstance(current, LiveStream):
                for chunk in current.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                offset += len(current.chunks)
                if not current.chunks:
                    await anyio.sleep(self.config.poll_interval)
            elif isinstance(current, Completed) and current.chunks is not None:
                for chunk in current.chunks[offset:]:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            else:  # released or taken over: the stream being followed broke off
                raise Conflict(
                    "The stream being followed ended early; retry with the same "
                    "Idempotency-Key.",
                    retry_after=1,
                )
            current = await self.streaming.stream_read(key, offset)

    async def release(self, lease: Lease) -> None:
        try:
            await self.store.release(lease.key, lease.owner)
        except Exception:
            logger.warning("could not release an idempotency key; it frees itself after "
                           "the lease", exc_info=True)


def _missing(header: str) -> AIError:
    return InvalidRequest(f"This endpoint requires an {header} header.", param=header)


def _in_flight(found: InFlight) -> Conflict:
    del found
    return Conflict(
        "A request with this Idempotency-Key is still in progress; retry after a moment.",
        retry_after=1,
    )


class _Recording:
    """The ``send`` wrapper: forwards every message at once and records it on the side."""

    def __init__(self, engine: IdempotencyEngine, lease: Lease, send: Send) -> None:
        self.engine = engine
        self.lease = lease
        self.downstream = send
        self.recording = True  # still a candidate for storing
        self.done = False  # completed or released
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.stream = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.publish: StreamingStore | None = None  # set while followers may be reading

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            message = await self._start(message)
        elif kind == "http.response.body" and self.recording:
            body = message.get("body", b"")
            if body:
                self.size += len(body)
                if self.size > self.engine.config.max_record_bytes:
                    logger.info("response above max_record_bytes: passed through, not stored")
                    await self._drop()
                else:
                    self.chunks.append(bytes(body))
                    if self.publish is not None:
                        await self._publish(self.publish.stream_append, bytes(body))
            if self.recording and not message.get("more_body", False):
                await self._complete()
        elif kind != "http.response.body" and self.recording:
            await self._drop()  # trailers, pathsend...: not replayable byte for byte
        await self.downstream(message)

    async def _start(self, message: Message) -> Message:
        status = int(message["status"])
        raw = list(message.get("headers", ()))
        if not self.engine.storable(status):
            await self._drop()
            return message
        length = get_header(raw, b"content-length")
        size = sum(len(k) + len(v) for k, v in raw)
        if length is not None and length.isdigit():
            size += int(length)
        if size > self.engine.config.max_record_bytes:
            await self._drop()
            return {**message, "headers": [*raw, STORED]}
        content_type = get_header(raw, b"content-type") or b""
        self.stream = content_type.split(b";")[0].strip().lower() == b"text/event-stream"
        self.status = status
        self.headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)
        self.size = size
        if self.stream and self.engine.streaming is not None:
            self.publish = self.engine.streaming
            await self._publish(self.publish.stream_start, status, self.headers)
        return message

    async def _publish(self, method: Callable[..., Awaitable[bool]], *args: object) -> None:
        try:
            await method(self.lease.key, self.lease.owner, *args)
        except Exception:
            logger.warning("could not publish a live stream for followers", exc_info=True)
            self.publish = None

    async def _complete(self) -> None:
        self.recording = False
        self.done = True
        record = Completed(
            status=self.status,
            headers=self.headers,
            body=None if self.stream else b"".join(self.chunks),
            chunks=tuple(self.chunks) if self.stream else None,
            fingerprint=self.lease.fingerprint,
        )
        self.chunks = []
        try:
            stored = await self.engine.store.complete(
                self.lease.key, self.lease.owner, record, self.engine.config.retention_seconds
            )
        except Exception:
            logger.warning("could not store an idempotent response", exc_info=True)
            return
        if not stored:
            logger.warning("idempotency lease expired before the response completed; not stored")

    async def _drop(self) -> None:
        self.recording = False
        self.chunks = []
        if not self.done:
            self.done = True
            await self.engine.release(self.lease)

    async def close(self) -> None:
        """After the app returned or raised: a response that never ended frees the key."""
        if not self.done:
            self.recording = False
            self.done = True
            await self.engine.release(self.lease)


async def replay(record: Completed, send: Send) -> None:
    """Send a stored response again: same status, headers and bytes (chunks for streams)."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in record.headers]
    headers.append(REPLAYED)
    await send({"type": "http.response.start", "status": record.status, "headers": headers})
    if record.chunks is not None:
        for chunk in record.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        await send({"type": "http.response.body", "body": record.body or b"", "more_body": False})


async def answer(begin: Begin, send: Send, request_id: str | None, type_base: str) -> None:
    """Send the answer ``begin`` decided on (a replay or a typed error)."""
    if begin.replay is not None:
        await replay(begin.replay, send)
    elif begin.error is not None:
        await send_problem(send, begin.error, request_id, type_base=type_base)
