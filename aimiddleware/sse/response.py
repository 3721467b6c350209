"""``EventStreamResponse``: an ASGI response that streams server-sent events.

Usable as the return value of a FastAPI or Starlette endpoint. Headers go out at once;
comment heartbeats fill silences (one timer task that sleeps until the next heartbeat is
due: no per-event timer); a watchdog ends the stream when a send stays blocked past
``send_timeout`` (a client that stopped reading); the end of the stream carries a usage
event and an explicit end marker in the stream's dialect, and the same figures go into the
request context for the usage, rate-limit and idempotency layers. The runtime is in
:mod:`aimiddleware.sse.stream`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

from starlette.background import BackgroundTask
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response

from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.errors import ExceptionMapper
from aimiddleware.sse.dialects import Dialect
from aimiddleware.sse.replay import ReplayBuffer
from aimiddleware.sse.stream import COMPLETED, Pricer, StreamResult, StreamSender
from aimiddleware.types import Receive, Scope, Send

__all__ = ["COMPLETED", "EventStreamResponse", "StreamResult"]


class EventStreamResponse(Response):
    """Stream events from an async or sync iterable.

    Items: ``str`` (a text delta in the dialect), ``dict`` (the dialect's native event; for
    the generic dialect, ``ServerSentEvent`` fields), :class:`ServerSentEvent`, ``bytes``
    (sent as is), :class:`~aimiddleware.usage.models.Usage` (latest wins, not sent),
    :class:`StreamResult`.

    ``heartbeat``: seconds of silence before a comment (``None`` = off). ``send_timeout``:
    seconds a single send may block before the stream is abandoned. ``replay``: a
    :class:`ReplayBuffer`; events then carry ids, a reconnect with ``Last-Event-ID``
    continues from the buffer, and the producer keeps running if the client drops.
    ``pricer(model, usage) -> Decimal | None`` prices the final usage event (default:
    ``ctx.state["usage.pricer"]`` when the usage layer provides one).
    """

    media_type = "text/event-stream"
    charset = "utf-8"

    def __init__(
        self,
        content: AsyncIterable[Any] | Iterable[Any],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        *,
        dialect: Dialect | None = None,
        heartbeat: float | None = 15.0,
        send_timeout: float | None = 30.0,
        cleanup_timeout: float = 5.0,
        replay: ReplayBuffer | None = None,
        stream_id: str | None = None,
        resume_idle_timeout: float = 60.0,
        model: str | None = None,
        pricer: Pricer | None = None,
        mapper: ExceptionMapper | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError("heartbeat must be > 0 seconds or None")
        if send_timeout is not None and not send_timeout > 0:
            raise ValueError("send_timeout must be > 0 seconds or None")
        if not cleanup_timeout > 0 or not resume_idle_timeout > 0:
            raise ValueError("cleanup_timeout and resume_idle_timeout must be > 0")
        if stream_id is not None and (not stream_id or any(c in stream_id for c in ":\r\n\0")):
            raise ValueError("stream_id must be non-empty without ':', CR, LF or NUL")
        if isinstance(content, AsyncIterable):
            self.iterator: AsyncIterator[Any] = aiter(content)
        elif isinstance(content, Iterable) and not isinstance(content, (str, bytes, dict)):
            self.sync_iterator = content
            self.iterator = iterate_in_threadpool(content)
        else:
            raise TypeError("content must be an async or sync iterable of events")
        self.status_code = status_code
        self.background = background
        self.dialect = dialect if dialect is not None else Dialect()
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.cleanup_timeout = cleanup_timeout
        self.replay = replay
        self.stream_id = stream_id
        self.resume_idle_timeout = resume_idle_timeout
        self.model = model
        self.pricer = pricer
        self.mapper = mapper or ExceptionMapper()
        self.init_headers(headers)
        raw = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        for name, value in ((b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")):
            if not any(k == name for k, _ in raw):
                raw.append((name, value))
        self.raw_headers = raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = scope.get("state", {}).get(SCOPE_KEY)
        stream = StreamSender(self, scope, send, ctx if isinstance(ctx, RequestContext) else None)
        await stream.run(receive)
        if self.background is not None:
            await self.background()
