"""Sending stored or live responses: a replay byte for byte, or following a live stream."""

from __future__ import annotations

import anyio

from aimiddleware.errors import Conflict
from aimiddleware.idempotency.models import Completed, InFlight, LiveStream
from aimiddleware.idempotency.store import StreamingStore
from aimiddleware.types import Send

__all__ = ["REPLAYED", "STORED", "follow", "replay"]

REPLAYED = (b"idempotent-replayed", b"true")
STORED = (b"idempotent-stored", b"false")


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


async def follow(
    store: StreamingStore, key: str, live: LiveStream, send: Send, poll_interval: float
) -> None:
    """Send another request's event stream from its start while it is going out."""
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
                await anyio.sleep(poll_interval)
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
        current = await store.stream_read(key, offset)
