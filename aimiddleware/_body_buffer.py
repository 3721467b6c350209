"""Reading a response body inside a retry loop, up to a limit (the retrying client's).

Past the limit, the part read so far goes back in front of the rest, which streams on.
The response is httpx's or httpx2's; what goes back in is a stream of its own module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import httpx

from aimiddleware._httpx_modules import (
    ASYNC_STREAMS,
    SYNC_STREAMS,
    AsyncByteStream2,
    Response,
    SyncByteStream2,
    httpx2,
)

if TYPE_CHECKING:
    _SyncStream = httpx.SyncByteStream | httpx2.SyncByteStream
    _AsyncStream = httpx.AsyncByteStream | httpx2.AsyncByteStream

__all__ = ["abuffer_body", "buffer_body"]


class _Rest(httpx.SyncByteStream, SyncByteStream2):
    """The chunks read so far, then the rest of ``stream`` as it arrives."""

    def __init__(self, head: list[bytes], rest: Iterator[bytes], stream: _SyncStream) -> None:
        self._head, self._rest, self._stream = head, rest, stream

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest

    def close(self) -> None:
        self._stream.close()


class _AsyncRest(httpx.AsyncByteStream, AsyncByteStream2):
    """The chunks read so far, then the rest of ``stream`` as it arrives."""

    def __init__(
        self, head: list[bytes], rest: AsyncIterator[bytes], stream: _AsyncStream
    ) -> None:
        self._head, self._rest, self._stream = head, rest, stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def _whole(response: Response, body: bytes) -> None:
    if isinstance(response, httpx.Response):
        response.stream = httpx.ByteStream(body)
    else:
        response.stream = httpx2.ByteStream(body)


def buffer_body(response: Response, limit: int) -> None:
    """Read the raw body into memory, up to ``limit`` bytes; past it, keep streaming."""
    stream = response.stream
    if not isinstance(stream, SYNC_STREAMS):
        return
    head: list[bytes] = []
    size = 0
    rest = iter(stream)
    for chunk in rest:
        head.append(chunk)
        size += len(chunk)
        if size > limit:
            response.stream = _Rest(head, rest, stream)
            return
    stream.close()
    _whole(response, b"".join(head))


async def abuffer_body(response: Response, limit: int) -> None:
    """Read the raw body into memory, up to ``limit`` bytes; past it, keep streaming."""
    stream = response.stream
    if not isinstance(stream, ASYNC_STREAMS):
        return
    head: list[bytes] = []
    size = 0
    rest = aiter(stream)
    async for chunk in rest:
        head.append(chunk)
        size += len(chunk)
        if size > limit:
            response.stream = _AsyncRest(head, rest, stream)
            return
    await stream.aclose()
    _whole(response, b"".join(head))
