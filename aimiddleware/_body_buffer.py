"""Reading a response body inside a retry loop, up to a limit (the retrying client's).

Past the limit, the part read so far goes back in front of the rest, which streams on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx

__all__ = ["abuffer_body", "buffer_body"]


class _Rest(httpx.SyncByteStream):
    """The chunks read so far, then the rest of ``stream`` as it arrives."""

    def __init__(
        self, head: list[bytes], rest: Iterator[bytes], stream: httpx.SyncByteStream
    ) -> None:
        self._head, self._rest, self._stream = head, rest, stream

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest

    def close(self) -> None:
        self._stream.close()


class _AsyncRest(httpx.AsyncByteStream):
    """The chunks read so far, then the rest of ``stream`` as it arrives."""

    def __init__(
        self, head: list[bytes], rest: AsyncIterator[bytes], stream: httpx.AsyncByteStream
    ) -> None:
        self._head, self._rest, self._stream = head, rest, stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def buffer_body(response: httpx.Response, limit: int) -> None:
    """Read the raw body into memory, up to ``limit`` bytes; past it, keep streaming."""
    stream = response.stream
    if not isinstance(stream, httpx.SyncByteStream):
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
    response.stream = httpx.ByteStream(b"".join(head))


async def abuffer_body(response: httpx.Response, limit: int) -> None:
    """Read the raw body into memory, up to ``limit`` bytes; past it, keep streaming."""
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):
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
    response.stream = httpx.ByteStream(b"".join(head))
