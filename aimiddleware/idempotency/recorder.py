"""The recording ``send``: forwards every message at once and records it on the side.

The record is completed on the last body message, before that message is forwarded, so an
answer whose client went away is still kept for the retry. A status that is not stored, a
response above ``max_record_bytes`` or one that never ends releases the key instead. A
record the store does not take (it is down) is written later by the engine's
:class:`~aimiddleware.idempotency.later.LaterWrites`. With ``follow_streams``, an event
stream is also published chunk by chunk for followers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aimiddleware.context import current_or_none
from aimiddleware.errors import StoreUnavailable
from aimiddleware.idempotency.models import Completed
from aimiddleware.idempotency.replay import STORED
from aimiddleware.idempotency.store import StreamingStore
from aimiddleware.sse.stream import FAILED
from aimiddleware.types import Message, Send

if TYPE_CHECKING:
    from aimiddleware.idempotency.engine import IdempotencyEngine, Lease

__all__ = ["Recording"]

logger = logging.getLogger("aimiddleware.idempotency")


def _ended_in_error() -> bool:
    """Whether this request's event stream ended with an error event (``EventStreamResponse``
    says so in the request context): a retry must run again, not replay the error."""
    ctx = current_or_none()
    return ctx is not None and ctx.state.get(FAILED) is True


class Recording:
    """The ``send`` wrapper: forwards every message at once and records it on the side."""

    __slots__ = (
        "chunks", "done", "downstream", "engine", "headers", "lease", "publish", "recording",
        "size", "status", "stream",
    )

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
        if self.recording:
            kind = message["type"]
            if kind == "http.response.body":
                body = message.get("body", b"")
                if body:
                    self.size += len(body)
                    if self.size > self.engine.config.max_record_bytes:
                        logger.info("response above max_record_bytes: passed through, not stored")
                        await self._drop()
                    else:
                        body = bytes(body)
                        self.chunks.append(body)
                        if self.publish is not None:
                            await self._publish(self.publish.stream_append, body)
                if self.recording and not message.get("more_body", False):
                    if self.stream and _ended_in_error():
                        await self._drop()  # a stream that failed after its 200: not stored
                    else:
                        await self._complete()
            elif kind == "http.response.start":
                message = await self._start(message)
            else:
                await self._drop()  # trailers, pathsend...: not replayable byte for byte
        await self.downstream(message)

    async def _start(self, message: Message) -> Message:
        status = int(message["status"])
        raw = message.get("headers", ())
        engine = self.engine
        if not engine.storable(status):
            await self._drop()
            return message
        size = 0
        length = content_type = None
        headers: list[tuple[str, str]] = []
        for key, value in raw:  # one pass: size, the two headers we read, the text form
            size += len(key) + len(value)
            if key == b"content-length":
                if length is None:
                    length = value
            elif key == b"content-type" and content_type is None:
                content_type = value
            headers.append((key.decode("latin-1"), value.decode("latin-1")))
        # the body declared: refused now if too large (its chunks are added as they pass)
        declared = int(length) if length is not None and length.isdigit() else 0
        if size + declared > engine.config.max_record_bytes:
            await self._drop()
            return {**message, "headers": [*raw, STORED]}
        self.stream = content_type is not None and (
            content_type.split(b";")[0].strip().lower() == b"text/event-stream"
        )
        self.status = status
        self.headers = tuple(headers)
        self.size = size
        if self.stream and engine.streaming is not None:
            self.publish = engine.streaming
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
        chunks = self.chunks
        self.chunks = []
        record = Completed(
            status=self.status,
            headers=self.headers,
            body=None if self.stream else (chunks[0] if len(chunks) == 1 else b"".join(chunks)),
            chunks=tuple(chunks) if self.stream else None,
            fingerprint=self.lease.fingerprint,
            stored_at=time.time(),
        )
        try:
            stored = await self.engine.store.complete(
                self.lease.key, self.lease.owner, record, self.engine.config.retention_seconds
            )
        except StoreUnavailable:
            # The client gets its answer now; the record follows when the store is back
            # (else a retry would be a 409 until the claim lapses, then run again).
            logger.warning("store unavailable: the idempotent response will be stored when it "
                           "is back (until the key's lease ends)")
            self.engine.later.add(self.lease, record)
            return
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
