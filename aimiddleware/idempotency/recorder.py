"""The recording ``send``: forwards every message at once and records it on the side.

The record is completed on the last body message, before that message is forwarded, so an
answer whose client went away is still kept for the retry. A status that is not stored, a
response above ``max_record_bytes`` or one that never ends releases the key instead. With
``follow_streams``, an event stream is also published chunk by chunk for followers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aimiddleware._asgi import get_header
from aimiddleware.idempotency.models import Completed
from aimiddleware.idempotency.replay import STORED
from aimiddleware.idempotency.store import StreamingStore
from aimiddleware.types import Message, Send

if TYPE_CHECKING:
    from aimiddleware.idempotency.engine import IdempotencyEngine, Lease

__all__ = ["Recording"]

logger = logging.getLogger("aimiddleware.idempotency")


class Recording:
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
