"""The recording ``send``: forwards every message at once and records it on the side.

The record is completed on the last body message, before that message is forwarded, so an
answer whose client went away is still kept for the retry; for a body of undeclared length
(a stream, but an ``EventStreamResponse``'s that ran its course), once that message is
forwarded and the app has returned (see :meth:`Recording._end`: an exception after it
releases the key). A status that is not stored, a
response above ``max_record_bytes`` or one that never ends releases the key instead, and so
does an end that may not be the answer's (see :func:`_cut`): a body of undeclared length
ended after its client left or its time limit cut it, as an ``@app.middleware("http")``
function between the stack and the endpoint ends the body it relays whatever stopped it. A
record the store does not take (it is down) is written later by the engine's
:class:`~aimiddleware.idempotency.later.LaterWrites`. With ``follow_streams``, an event
stream is also published chunk by chunk for followers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from aimiddleware._cancel_watch import LIMIT_SCOPE
from aimiddleware.context import RequestContext, current_or_none
from aimiddleware.errors import StoreUnavailable
from aimiddleware.idempotency.models import Completed
from aimiddleware.idempotency.replay import STORED
from aimiddleware.idempotency.store import StreamingStore
from aimiddleware.sse.stream import COMPLETED, FAILED
from aimiddleware.types import Message, Send

if TYPE_CHECKING:
    from aimiddleware.idempotency.engine import IdempotencyEngine, Lease

__all__ = ["Recording"]

logger = logging.getLogger("aimiddleware.idempotency")


def _cut(ctx: RequestContext | None, stream: bool, whole: bool) -> bool:
    """Is the end of this response (an event ``stream`` or not; ``whole``: a declared length
    its body filled) one a retry must not replay?

    An event stream that ended with an error event (``EventStreamResponse`` says so in the
    request context); or a body of undeclared length that ended after its client left or
    its time limit cut it: an end the app sent after the cut, or that something between the
    stack and the endpoint sent for it (an ``@app.middleware("http")`` function ends the
    body it relays, cleanly, when the endpoint stops on a disconnect), not the answer's;
    unless an ``EventStreamResponse`` says it ran its course (a resumable one's producer
    runs on after its client left, every frame sent down the chain)."""
    if ctx is None:
        return False
    if stream and ctx.state.get(FAILED) is True:
        return True
    if whole or ctx.state.get(COMPLETED) is True:  # (an EventStreamResponse that ran its course)
        return False
    if ctx.disconnected:
        return True
    limit = ctx.state.get(LIMIT_SCOPE)  # (a time limit: its scope, cancelled at the deadline)
    return limit is not None and limit.cancel_called


def _ran_its_course(ctx: RequestContext | None) -> bool:
    """Did an ``EventStreamResponse`` say its stream ended normally (its end is the
    answer's, whatever the app does after it)?"""
    return ctx is not None and ctx.state.get(COMPLETED) is True


class Recording:
    """The ``send`` wrapper: forwards every message at once and records it on the side."""

    __slots__ = (
        "chunks", "declared", "done", "downstream", "ended", "engine", "headers", "lease",
        "publish", "recording", "size", "status", "stream",
    )

    def __init__(self, engine: IdempotencyEngine, lease: Lease, send: Send) -> None:
        self.engine = engine
        self.lease = lease
        self.downstream = send
        self.recording = True  # still a candidate for storing
        self.done = False  # completed or released
        self.ended = False  # a body of undeclared length ended, to be kept once the app returns
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.stream = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.declared = -1  # what size is once a body of declared length is whole (-1: none)
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
                    ctx = current_or_none()
                    if self.size < self.declared and self._has_body(ctx):
                        await self._drop()  # short of its Content-Length: not the answer
                    elif _cut(ctx, self.stream, self.size == self.declared):
                        await self._drop()  # failed or cut after its head: not stored
                    elif self.declared < 0 and not _ran_its_course(ctx):
                        await self._end(message)  # kept once the app returns (see _end)
                        return
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
        if length is not None and length.isdigit():
            self.declared = size + declared  # (what size reaches once the body is whole)
        if self.stream and engine.streaming is not None:
            self.publish = engine.streaming
            await self._publish(self.publish.stream_start, status, self.headers)
        return message

    def _has_body(self, ctx: RequestContext | None) -> bool:
        """Must the body fill the Content-Length declared? (Not a 304's, nor a HEAD's: the
        length is the representation's.) One that ends short is cut: an
        ``@app.middleware("http")`` function ends the body it relays cleanly when the
        endpoint's iterator raises, and a replay of it would fail every retry."""
        return self.status != 304 and (ctx is None or ctx.method != "HEAD")

    async def _end(self, message: Message) -> None:
        """Forward the last message of a body of undeclared length (but an
        ``EventStreamResponse``'s that ran its course), whose record is completed only once
        the app returns (:meth:`returned`): an ``@app.middleware("http")`` function between
        the stack and the endpoint ends the body it relays cleanly when the endpoint's
        iterator raises, and re-raises the exception only then (the key is then released,
        by :meth:`close`). Should forwarding fail (the client left), it is kept at once, as
        an answer whose client went away is."""
        self.ended = True
        try:
            await self.downstream(message)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.returned()
            raise

    async def returned(self) -> None:
        """The app returned: a body held back by :meth:`_end` is the answer; store it."""
        if self.ended and not self.done:
            await self._complete()

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
