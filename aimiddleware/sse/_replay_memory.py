"""The memory mode of :class:`~aimiddleware.sse.replay.ReplayBuffer`: streams of frames
kept in one LRU order, bounded by count, by bytes and by a TTL.

A stream's frames are one dict of seq -> bytes, which the garbage collector neither tracks
nor walks; what each holds is counted as measured (the bytes, and the objects around them),
so ``max_bytes`` bounds the process memory the buffer takes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# What the memory buffer holds beyond a frame's bytes (CPython 3.11, measured with
# tracemalloc): its bytes object, its seq as an int and its slot in the stream's dict;
# beyond a stream's frames: the stream, its dict, its key and its place in the LRU order.
_FRAME_OVERHEAD = 100
_STREAM_OVERHEAD = 600


@dataclass(slots=True)
class MemStream:
    # seq -> frame, in the order appended: a dict of ints and bytes, which the garbage
    # collector does not track (nor walk: in an OrderedDict, 400,000 frames added ~15 ms to
    # every full collection)
    frames: dict[int, bytes] = field(default_factory=dict)
    # while the seqs appended are consecutive (as EventStreamResponse appends them), the
    # oldest and newest kept: no search for either
    dense: bool = True
    first: int = 0
    last: int = 0
    size: int = _STREAM_OVERHEAD  # the bytes it holds, as counted against max_bytes
    done: bool = False
    expires: float = 0.0
    changed: anyio.Event | None = None

    def add(self, seq: int, frame: bytes) -> int:
        """Keep ``frame`` as ``seq``; the bytes it added."""
        frames = self.frames
        held = frames.get(seq)
        if held is not None:  # (the same seq again: replaced, in its place)
            grown = len(frame) - len(held)
        else:
            grown = len(frame) + _FRAME_OVERHEAD
            if not frames:
                self.first = self.last = seq
            elif self.dense and seq == self.last + 1:
                self.last = seq
            else:
                self.dense = False
        frames[seq] = frame
        self.size += grown
        return grown

    def oldest(self) -> int | None:
        if not self.frames:
            return None
        return self.first if self.dense else next(iter(self.frames))

    def newest(self) -> int | None:
        if not self.frames:
            return None
        return self.last if self.dense else next(reversed(self.frames))

    def drop_oldest(self) -> int:
        """Drop the oldest frame (there is one); the bytes it held."""
        if self.dense:
            seq = self.first
            self.first += 1
        else:
            seq = next(iter(self.frames))
        freed = len(self.frames.pop(seq)) + _FRAME_OVERHEAD
        self.size -= freed
        return freed

    def after(self, after: int, count: int | None) -> list[tuple[int, bytes]]:
        """The frames kept after seq ``after``, in order (the first ``count`` if given)."""
        frames = self.frames
        if self.dense and frames:
            start = max(after + 1, self.first)
            stop = self.last + 1 if count is None else min(self.last + 1, start + count)
            return [(s, frames[s]) for s in range(start, stop)]
        out = [(s, f) for s, f in frames.items() if s > after]
        return out if count is None else out[:count]


class MemoryStreams:
    """The streams kept, least recently used first: past ``max_streams`` or ``max_bytes``
    the least recently used go whole (a stream larger than ``max_bytes`` by itself keeps
    its newest frames); each keeps its last ``max_events`` frames for ``ttl`` seconds after
    its last use."""

    def __init__(self, *, max_events: int, max_streams: int, max_bytes: int, ttl: float) -> None:
        self.max_events = max_events
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0  # the sizes of the streams kept
        self._streams: OrderedDict[tuple[str, str], MemStream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def get(self, principal: str, sid: str, create: bool = False) -> MemStream | None:
        now = time.monotonic()
        streams = self._streams
        while streams:  # drop expired streams, oldest first
            oldest = next(iter(streams.values()))
            if oldest.expires > now:
                break
            self.bytes -= streams.popitem(last=False)[1].size
        stream = streams.get((principal, sid))
        if stream is None and create:
            stream = streams[(principal, sid)] = MemStream()
            self.bytes += stream.size
            while len(streams) > self.max_streams:
                self.bytes -= streams.popitem(last=False)[1].size
        if stream is not None:
            stream.expires = now + self.ttl
            streams.move_to_end((principal, sid))
        return stream

    def append(self, stream: MemStream, seq: int, frame: bytes) -> None:
        """Add a frame to ``stream`` (just got: the most recently used), then keep to the
        bounds."""
        self.bytes += stream.add(seq, frame)
        while len(stream.frames) > self.max_events:
            self.bytes -= stream.drop_oldest()
        streams = self._streams
        while self.bytes > self.max_bytes:
            if len(streams) > 1:  # the least recently used goes whole (never ``stream``)
                self.bytes -= streams.popitem(last=False)[1].size
            elif len(stream.frames) > 1:
                self.bytes -= stream.drop_oldest()
            else:
                break
