"""Replay buffer for ``Last-Event-ID`` resume: memory or Redis, bounded, with a TTL.

A producing stream appends every frame (already carrying its ``id: <stream>:<seq>`` line)
and marks the end; a reconnecting client is served the frames strictly after the sequence
number in its ``Last-Event-ID`` and then follows the live stream until its end, from any
worker when the buffer is on Redis (a Redis stream per event stream, read with ``XREAD
BLOCK``). Buffers are scoped by principal: one tenant can never resume another's stream.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Literal

import anyio

from aimiddleware.sse._replay_memory import DEFAULT_MAX_BYTES, MemoryStreams, MemStream
from aimiddleware.storage import Storage, redis_errors

__all__ = ["ReplayBuffer", "parse_event_id"]

State = Literal["gone", "complete", "available"]
_NAMESPACE = "sse"
# The oldest entry, the entries after ARGV[1] (at most ARGV[2], if set) and the newest two
# (the end marker, if any, and the newest frame): one atomic read of a stream. (Entries come
# back as [id, [field, value]]: one field each.)
_READ = """
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local entries
if ARGV[2] == '' then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+')
else
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 2)
return {oldest, entries, newest}
"""


def parse_event_id(value: str) -> tuple[str, int] | None:
    """``"<stream>:<seq>"`` -> ``(stream, seq)``; ``None`` for ids this module did not write."""
    sid, sep, seq = value.strip().rpartition(":")
    # (ASCII digits only: str.isdigit() also takes "²", which int() refuses)
    if not sep or not sid or not seq.isascii() or not seq.isdigit():
        return None
    if len(seq) > 18 or len(sid) > 128:
        return None
    return sid, int(seq)


class ReplayBuffer:
    """Keeps the last ``max_events`` frames of each stream for ``ttl`` seconds.

    In memory, at most ``max_streams`` streams and ``max_bytes`` of process memory (the
    frames and the objects around them, measured) are kept: past either bound the least
    recently used streams go whole, first (a stream larger than ``max_bytes`` by itself
    keeps its newest frames). A resume of a stream no longer kept is answered 404.
    On Redis, each stream is trimmed to ``max_events`` and expires after ``ttl``.
    """

    def __init__(
        self,
        storage: Storage | str = "memory://",
        *,
        max_events: int = 10_000,
        ttl: float = 600.0,
        max_streams: int = 10_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_events < 1 or max_streams < 1:
            raise ValueError("max_events and max_streams must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if not ttl > 0:
            raise ValueError("ttl must be > 0 seconds")
        self.storage = Storage.coerce(storage)
        self.max_events = max_events
        self.ttl = ttl
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        self._mem = MemoryStreams(
            max_events=max_events, max_streams=max_streams, max_bytes=max_bytes, ttl=ttl
        )

    @staticmethod
    def new_stream_id() -> str:
        return secrets.token_hex(8)

    def _key(self, principal: str, sid: str) -> str:
        return self.storage.key(_NAMESPACE, principal, sid)

    @staticmethod
    def _wake(stream: MemStream) -> None:
        if stream.changed is not None:
            stream.changed.set()
            stream.changed = None

    # -- API -----------------------------------------------------------------------------

    async def append(self, principal: str, sid: str, seq: int, frame: bytes) -> None:
        if self.storage.is_memory:
            stream = self._mem.get(principal, sid, create=True)
            assert stream is not None
            self._mem.append(stream, seq, frame)
            self._wake(stream)
            return
        key = self._key(principal, sid)
        async with redis_errors("event replay"):
            pipe = self.storage.redis.pipeline(transaction=False)
            pipe.xadd(key, {"f": frame}, id=f"{seq}-1", maxlen=self.max_events, approximate=False)
            pipe.pexpire(key, int(self.ttl * 1000))
            await pipe.execute()

    async def finish(self, principal: str, sid: str) -> None:
        """Mark the stream complete (its end frames were appended before)."""
        if self.storage.is_memory:
            stream = self._mem.get(principal, sid, create=True)
            assert stream is not None
            stream.done = True
            self._wake(stream)
            return
        key = self._key(principal, sid)
        async with redis_errors("event replay"):
            pipe = self.storage.redis.pipeline(transaction=False)
            pipe.xadd(key, {"done": b"1"}, id="*", maxlen=self.max_events, approximate=False)
            pipe.pexpire(key, int(self.ttl * 1000))
            await pipe.execute()

    async def state(self, principal: str, sid: str, after: int) -> State:
        """``gone`` (unknown, expired, events after ``after`` dropped, or ``after`` past the
        newest frame: an id the stream never sent), ``complete`` (ended and nothing after
        ``after``), else ``available``."""
        frames, done, first, newest = await self._read(principal, sid, after, count=1)
        if first is None or first > after + 1:
            return "gone"
        if newest is not None and after > newest:
            # A hand-edited or corrupted id (the random part matched): followed, it would
            # wait for a frame after it, showing none of those before, until the end.
            return "gone"
        if done and not frames:
            return "complete"
        return "available"

    async def _read(
        self, principal: str, sid: str, after: int, count: int | None = None
    ) -> tuple[list[tuple[int, bytes]], bool, int | None, int | None]:
        """Frames after ``after``, whether it ended, the oldest kept seq (None: no stream)
        and the newest (None: no frame)."""
        if self.storage.is_memory:
            stream = self._mem.get(principal, sid)
            if stream is None:
                return [], False, None, None
            first = stream.oldest()
            if first is None:
                first = after + 1
            return stream.after(after, count or None), stream.done, first, stream.newest()
        key = self._key(principal, sid)
        async with redis_errors("event replay"):
            # One script, not three pipelined reads: a trim between them (frames appended
            # by the producer) would pair an old "oldest kept" with newer frames, a gap
            # that no one would see. (One key: one slot on a Cluster.)
            read = self.storage.script(_READ)
            oldest, entries, newest = await read(
                keys=[key], args=[f"({after}-1", "" if count is None else count]
            )
        if not oldest:
            return [], False, None, None
        first = int(oldest[0][0].split(b"-")[0]) if oldest[0][1][0] == b"f" else after + 1
        done = bool(newest) and newest[0][1][0] == b"done"
        last = next((int(i.split(b"-")[0]) for i, e in newest if e[0] == b"f"), None)
        out = [(int(i.split(b"-")[0]), e[1]) for i, e in entries if e[0] == b"f"]
        return out, done, first, last

    async def follow(
        self, principal: str, sid: str, after: int, *, idle_timeout: float = 60.0
    ) -> AsyncIterator[bytes]:
        """Frames after ``after``, then live ones, until the stream ends (or stays idle).

        Raises ``NotFound`` if the stream stops being kept meanwhile (evicted, or its frames
        after the last one given trimmed): the rest cannot be given without a gap.
        """
        last = after
        idle_since = time.monotonic()
        while True:
            frames, done, first, _ = await self._read(principal, sid, last)
            if first is None or first > last + 1:
                from aimiddleware.errors import NotFound

                raise NotFound("The resumed stream is no longer kept.")
            for seq, frame in frames:
                last = seq
                yield frame
            if frames:
                idle_since = time.monotonic()
                continue  # read again before waiting: more may have come, or the end
            if done:
                return
            if time.monotonic() - idle_since > idle_timeout:
                from aimiddleware.errors import Timeout

                raise Timeout("The resumed stream produced no event in time.")
            await self._wait(principal, sid, last)

    async def _wait(self, principal: str, sid: str, after: int) -> None:
        if self.storage.is_memory:
            stream = self._mem.get(principal, sid)
            if stream is None:
                return
            if stream.changed is None:
                stream.changed = anyio.Event()
            with anyio.move_on_after(1.0):
                await stream.changed.wait()
            return
        key = self._key(principal, sid)
        block = max(1, min(1000, int(self.storage.socket_timeout * 500)))
        async with redis_errors("event replay"):
            # Wakes on any new entry (frame or end marker) after the last frame seen.
            await self.storage.redis.xread({key: f"{after}-1"}, count=1, block=block)
