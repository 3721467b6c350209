"""In-process idempotency store: bounded, with per-record expiry.

Completed records live in an LRU order bounded in bytes (least recently used evicted first),
each with its own expiry (a heap of expiry times drops them as they pass); leases live in a
plain dict (one per running request, so bounded by concurrency) and are never evicted early.
A record is kept as a tuple of its values (text, bytes and numbers), which the garbage
collector stops tracking, and becomes a :class:`Completed` again when read: 12,000 small
answers held as models were ~48,000 tracked objects, walked by every full collection.

Every method runs without awaiting in between its reads and writes, so concurrent tasks on
one event loop cannot interleave; a ``threading.Lock`` makes the store safe when shared
across threads too. No anyio primitive is created, so one instance may be used from several
event loops.

Only correct within one process: use a Redis/Valkey storage URL for several workers.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict

from aimiddleware._trusted import field_masks, trusted
from aimiddleware.idempotency.models import Claimed, Completed, InFlight, LiveStream, Outcome

__all__ = ["MemoryIdempotencyStore"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# A completed record as held: (expires_at, size, fields set as a bit mask over _FIELDS, then
# the values of _FIELDS in order).
_Row = tuple[float, int, int, int, tuple[tuple[str, str], ...], bytes | None,
             tuple[bytes, ...] | None, str, float]
_FIELDS = ("status", "headers", "body", "chunks", "fingerprint", "stored_at")
_FIELD_SETS, _MASKS = field_masks(_FIELDS)


def _row(record: Completed, expires_at: float, size: int) -> _Row:
    mask = _MASKS[frozenset(record.model_fields_set)]
    return (expires_at, size, mask, record.status, record.headers, record.body, record.chunks,
            record.fingerprint, record.stored_at)


def _completed(row: _Row) -> Completed:
    _, _, mask, status, headers, body, chunks, fingerprint, stored_at = row
    values = {"status": status, "headers": headers, "body": body, "chunks": chunks,
              "fingerprint": fingerprint, "stored_at": stored_at}  # (_FIELDS)
    return trusted(Completed, values, _FIELD_SETS[mask])


class MemoryIdempotencyStore:
    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.max_bytes = max_bytes
        self._done: OrderedDict[str, _Row] = OrderedDict()  # least recently used first
        self._bytes = 0  # the sizes of the records in _done
        # (expires_at, key) of every record stored, a heap; one replaced or evicted since
        # stays until it comes up (or the heap is rebuilt from _done when twice its size)
        self._expiry: list[tuple[float, str]] = []
        # key -> (owner, fingerprint, expires_at); an ``InFlight`` is built only to answer
        self._leases: dict[str, tuple[str, str, float]] = {}
        self._live: dict[str, tuple[str, int, tuple[tuple[str, str], ...], list[bytes]]] = {}
        self._lock = threading.Lock()

    def _lease(self, key: str, now: float) -> tuple[str, str, float] | None:
        lease = self._leases.get(key)
        if lease is not None and lease[2] <= now:
            del self._leases[key]
            return None
        return lease

    async def claim(self, key: str, fingerprint: str, owner: str, lease: float) -> Outcome:
        now = time.time()
        with self._lock:
            held = self._lease(key, now)
            if held is not None:
                return _in_flight(held)
            done = self._get_done(key, now)
            if done is not None:
                return _completed(done)
            if len(self._leases) > 1024:
                self._purge(now)
            self._leases[key] = (owner, fingerprint, now + lease)
            return Claimed(owner=owner)

    async def heartbeat(self, key: str, owner: str, lease: float) -> bool:
        now = time.time()
        with self._lock:
            held = self._lease(key, now)
            if held is None or held[0] != owner:
                return False
            self._leases[key] = (owner, held[1], now + lease)
            return True

    async def complete(self, key: str, owner: str, record: Completed, retention: float) -> bool:
        now = time.time()
        with self._lock:
            held = self._lease(key, now)
            if held is None or held[0] != owner:
                return False
            del self._leases[key]
            self._live.pop(key, None)
            size = record.size
            if size <= self.max_bytes and retention > 0:
                self._put(key, _row(record, now + retention, size), now)
            return True

    async def release(self, key: str, owner: str) -> bool:
        with self._lock:
            held = self._leases.get(key)
            if held is None or held[0] != owner:
                return False
            del self._leases[key]
            self._live.pop(key, None)
            return True

    async def stream_start(
        self, key: str, owner: str, status: int, headers: tuple[tuple[str, str], ...]
    ) -> bool:
        with self._lock:
            held = self._lease(key, time.time())
            if held is None or held[0] != owner:
                return False
            self._live[key] = (owner, status, headers, [])
            return True

    async def stream_append(self, key: str, owner: str, chunk: bytes) -> bool:
        with self._lock:
            live = self._live.get(key)
            if live is None or live[0] != owner:
                return False
            live[3].append(chunk)
            return True

    async def stream_read(
        self, key: str, offset: int
    ) -> LiveStream | InFlight | Completed | None:
        now = time.time()
        with self._lock:
            held = self._lease(key, now)
            if held is not None:
                live = self._live.get(key)
                if live is None or live[0] != held[0]:
                    return _in_flight(held)
                _, status, headers, chunks = live
                return LiveStream(
                    status=status, headers=headers, chunks=tuple(chunks[offset:]), offset=offset
                )
            self._live.pop(key, None)
            done = self._get_done(key, now)
            return _completed(done) if done is not None else None

    def _get_done(self, key: str, now: float) -> _Row | None:
        """The record held for ``key`` (marked most recently used), unless it has expired."""
        done = self._done.get(key)
        if done is None:
            return None
        if done[0] <= now:
            self._drop(key)
            return None
        self._done.move_to_end(key)
        return done

    def _drop(self, key: str) -> None:
        self._bytes -= self._done.pop(key)[1]

    def _put(self, key: str, row: _Row, now: float) -> None:
        done = self._done
        if key in done:
            self._drop(key)
        done[key] = row
        self._bytes += row[1]
        heapq.heappush(self._expiry, (row[0], key))
        self._expire(now)
        while self._bytes > self.max_bytes:  # the least recently used go first
            self._bytes -= done.popitem(last=False)[1][1]

    def _expire(self, now: float) -> None:
        heap, done = self._expiry, self._done
        if len(heap) > 2 * len(done) + 64:  # mostly entries of records no longer held
            self._expiry = heap = [(row[0], key) for key, row in done.items()]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            row = done.get(key)
            if row is not None and row[0] <= now:
                self._drop(key)

    def _purge(self, now: float) -> None:
        for key in [k for k, v in self._leases.items() if v[2] <= now]:
            del self._leases[key]
            self._live.pop(key, None)


def _in_flight(held: tuple[str, str, float]) -> InFlight:
    return InFlight(owner=held[0], fingerprint=held[1], expires_at=held[2])
