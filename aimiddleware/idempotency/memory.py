"""In-process idempotency store: bounded, with per-record expiry.

Completed records live in a ``cachetools.TLRUCache`` (TTL per record, least recently used
evicted first) bounded in bytes; leases live in a plain dict (one per running request, so
bounded by concurrency) and are never evicted early. Every method runs without awaiting in
between its reads and writes, so concurrent tasks on one event loop cannot interleave; a
``threading.Lock`` makes the store safe when shared across threads too. No anyio primitive
is created, so one instance may be used from several event loops.

Only correct within one process: use a Redis/Valkey storage URL for several workers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cachetools import TLRUCache

from aimiddleware.idempotency.models import Claimed, Completed, InFlight, LiveStream, Outcome

__all__ = ["MemoryIdempotencyStore"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def _ttu(_key: Any, value: tuple[float, Completed, int], now: float) -> float:
    return value[0]


def _size(value: tuple[float, Completed, int]) -> int:
    return value[2]


class MemoryIdempotencyStore:
    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self._done: TLRUCache[str, tuple[float, Completed, int]] = TLRUCache(
            maxsize=max_bytes, ttu=_ttu, timer=time.time, getsizeof=_size
        )
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
            done = self._done.get(key)
            if done is not None:
                return done[1]
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
            if size <= self._done.maxsize:
                self._done[key] = (now + retention, record, size)
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
            done = self._done.get(key)
            return done[1] if done is not None else None

    def _purge(self, now: float) -> None:
        for key in [k for k, v in self._leases.items() if v[2] <= now]:
            del self._leases[key]
            self._live.pop(key, None)


def _in_flight(held: tuple[str, str, float]) -> InFlight:
    return InFlight(owner=held[0], fingerprint=held[1], expires_at=held[2])
