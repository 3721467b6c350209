"""Sending stored or live responses: a replay byte for byte, or following a live stream.

A response stored compressed (a compression middleware inside the stack compressed it for
the first request) is sent decoded to a retry whose ``Accept-Encoding`` does not take that
coding, when it is gzip or deflate: a replay never sends such a client bytes it cannot read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import anyio

from aimiddleware._encoding import DECODABLE, Inflater, accepts, content_coding
from aimiddleware.errors import Conflict
from aimiddleware.idempotency.models import Completed, InFlight, LiveStream
from aimiddleware.idempotency.resume import After, after_event, as_sent, last_event_id
from aimiddleware.idempotency.store import StreamingStore
from aimiddleware.types import Send

__all__ = ["REPLAYED", "STORED", "follow", "replay"]

REPLAYED = (b"idempotent-replayed", b"true")
STORED = (b"idempotent-stored", b"false")

RawHeaders = list[tuple[bytes, bytes]]
Accept = Iterable[tuple[bytes, bytes]] | None  # the retrying request's headers


async def replay(record: Completed, send: Send, accept: Accept = None) -> None:
    """Send a stored response again: same status, headers and bytes (chunks for streams).

    ``accept``: the retrying request's headers; ``None`` sends the stored bytes whatever
    they are encoded in."""
    headers, inflater = _for_client(record.headers, accept)
    headers.append(REPLAYED)
    chunks = record.chunks
    last = last_event_id(accept)
    if last is not None and chunks is not None and as_sent(record.headers):
        rest = after_event(chunks, last)  # a reconnecting SSE client: what it has not seen
        if rest == []:  # it saw the end: 204, as a resumable stream answers (EventSource stops)
            await send({"type": "http.response.start", "status": 204, "headers": [REPLAYED]})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if rest is not None:
            chunks = tuple(rest)
    if chunks is None and inflater is not None:
        if await _send_decoded(record.status, headers, record.body or b"", inflater, send):
            return
        headers, inflater = _for_client(record.headers, None)  # corrupt: as it was stored
        headers.append(REPLAYED)
    await send({"type": "http.response.start", "status": record.status, "headers": headers})
    if chunks is not None:
        await _send_chunks(chunks, inflater, send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        await send({"type": "http.response.body", "body": record.body or b"", "more_body": False})


async def follow(
    store: StreamingStore, key: str, live: LiveStream, send: Send, poll_interval: float,
    accept: Accept = None,
) -> None:
    """Send another request's event stream from its start while it is going out."""
    headers, inflater = _for_client(live.headers, accept)
    await send({"type": "http.response.start", "status": live.status,
                "headers": [*headers, REPLAYED]})
    last = last_event_id(accept)
    # A reconnecting SSE client: the events after the one it saw last (all of them if the
    # stream never carries that id: what was held back goes out at its end).
    after = After(last) if last is not None and as_sent(live.headers) else None
    offset = 0
    current: LiveStream | InFlight | Completed | None = live
    while True:
        if isinstance(current, LiveStream):
            await _send_chunks(_cut(after, current.chunks), inflater, send)
            offset += len(current.chunks)
            if not current.chunks:
                await anyio.sleep(poll_interval)
        elif isinstance(current, Completed) and current.chunks is not None:
            if after is not None and not after.found:  # never carried: the whole stream
                after, offset = None, 0
            await _send_chunks(_cut(after, current.chunks[offset:]), inflater, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        else:  # released or taken over: the stream being followed broke off
            raise Conflict(
                "The stream being followed ended early; retry with the same "
                "Idempotency-Key.",
                retry_after=1,
            )
        current = await store.stream_read(key, offset)


def _cut(after: After | None, chunks: Sequence[bytes]) -> Iterable[bytes]:
    return chunks if after is None else [piece for piece in map(after.feed, chunks) if piece]


def _for_client(
    stored: tuple[tuple[str, str], ...], accept: Accept
) -> tuple[RawHeaders, Inflater | None]:
    """The head to send, and the decoder of a body the client does not accept as stored
    (``None``: send it as stored). A coding we cannot decode (br) is sent as stored."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored]
    if accept is None:
        return headers, None
    coding = b""
    for name, value in headers:
        if name.lower() == b"content-encoding":
            coding = content_coding(value)
    if not coding or coding not in DECODABLE or accepts(accept, coding):
        return headers, None
    # the length of the stored bytes is not that of the decoded ones: set by _send_decoded
    return [
        (k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")
    ], Inflater(coding)


async def _send_chunks(chunks: Iterable[bytes], inflater: Inflater | None, send: Send) -> None:
    for chunk in chunks:
        if inflater is None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            continue
        for piece in inflater.pieces(chunk):
            await send({"type": "http.response.body", "body": piece, "more_body": True})


async def _send_decoded(
    status: int, headers: RawHeaders, body: bytes, inflater: Inflater, send: Send
) -> bool:
    """A stored body decoded: with its Content-Length when it decodes to one piece (up to
    ``STEP``), else in pieces (memory stays bounded, whatever the body expands to).
    ``False``: nothing sent, the body is corrupt."""
    pieces = inflater.pieces(body)
    first = next(pieces, b"")
    second = next(pieces, None)
    if inflater.failed:
        return False
    if second is None:
        headers.append((b"content-length", b"%d" % len(first)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if second is None:
        await send({"type": "http.response.body", "body": first, "more_body": False})
        return True
    await send({"type": "http.response.body", "body": first, "more_body": True})
    await send({"type": "http.response.body", "body": second, "more_body": True})
    for piece in pieces:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return True
