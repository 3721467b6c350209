"""In-process backend: three integers per (principal, limit), leases with expiry times.

Cost per admission is independent of the number of principals and of the tokens already
in the window: counters are sliding-window pairs (no entry per token), and idle principals
are dropped lazily from the front of an LRU order (amortized O(1), no scan of all keys).
Each method runs without an ``await`` inside, so it is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aimiddleware.ratelimit.backend import Adjustment, Decision, Hit, WindowState, roll

__all__ = ["MemoryBackend"]

_state = tuple.__new__  # builds a WindowState from a 4-tuple without a Python-level call


@dataclass
class _Entry:
    counters: dict[str, list[int]] = field(default_factory=dict)  # field -> [index, prev, curr]
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> expiry (ms)
    expires_ms: int = 0
    marks: dict[str, int] = field(default_factory=dict)  # alert tag -> expiry (ms)


class MemoryBackend:
    """The embedded default. ``clock`` returns seconds (``time.time`` by default)."""

    #: State is private to this process (leases cannot outlive their holder).
    shared = False

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or time.time
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._evict_at = 0  # no eviction pass before this time (ms)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _entry(self, principal: str, now: int) -> _Entry:
        if now >= self._evict_at:
            self._evict(now)
        entry = self._entries.get(principal)
        if entry is None:
            entry = self._entries[principal] = _Entry()
        else:
            self._entries.move_to_end(principal)
        return entry

    def _evict(self, now: int, budget: int = 4) -> None:
        # Least recently used first; stop at the first live one (bounded work per call), and
        # look again when it expires (at most a second later: the order changes meanwhile).
        for _ in range(budget):
            if not self._entries:
                return
            principal, entry = next(iter(self._entries.items()))
            if entry.expires_ms > now:
                self._evict_at = min(entry.expires_ms, now + 1000)
                return
            if entry.leases:  # requests still in flight: keep it, look again later
                entry.expires_ms = now + 60_000
                self._entries.move_to_end(principal)
                continue
            del self._entries[principal]

    def __len__(self) -> int:
        return len(self._entries)

    async def acquire(
        self,
        principal: str,
        hits: Sequence[Hit],
        *,
        lease: str | None = None,
        concurrency: int = 0,
        lease_ttl_ms: int = 0,
    ) -> Decision:
        now = int(self.clock() * 1000)
        entry = self._entry(principal, now)
        counters = entry.counters
        rows: list[tuple[int, int, int, int]] = []  # (index, prev, curr, elapsed)
        failed = -1
        longest = 0
        for name, window, limit, cost in hits:
            index = now // window
            stored = counters.get(name)
            # backend.roll and backend.fits, inlined (the same float expression as the Lua).
            if stored is None:
                prev = curr = 0
            elif stored[0] == index:
                prev, curr = stored[1], stored[2]
            elif stored[0] == index - 1:
                prev, curr = stored[2], 0
            else:
                prev = curr = 0
            elapsed = now - index * window
            if failed < 0:
                used = float(prev) * float(window - elapsed) / float(window) + float(curr)
                if not used + float(cost) <= float(limit):
                    failed = len(rows)
            rows.append((index, prev, curr, elapsed))
            if 2 * window > longest:
                longest = 2 * window
        in_flight = 0
        if concurrency > 0:
            leases = entry.leases
            if leases:
                for k in [k for k, exp in leases.items() if exp <= now]:
                    del leases[k]
                in_flight = len(leases)
            if failed < 0 and in_flight >= concurrency:
                failed = len(hits)
        if now + longest > entry.expires_ms:
            entry.expires_ms = now + longest
        if failed >= 0:
            refused = tuple([_state(WindowState, r) for r in rows])
            return Decision(False, failed, refused, in_flight, now)
        states = []
        for (name, _, _, cost), (index, prev, curr, elapsed) in zip(hits, rows, strict=True):
            curr += cost
            counters[name] = [index, prev, curr]
            states.append(_state(WindowState, (index, prev, curr, elapsed)))
        if concurrency > 0 and lease is not None:
            entry.leases[lease] = now + lease_ttl_ms
            in_flight += 1
        return Decision(True, -1, tuple(states), in_flight, now)

    async def adjust(
        self, principal: str, adjustments: Sequence[Adjustment], *, release: str | None = None
    ) -> None:
        now = int(self.clock() * 1000)
        entry = self._entry(principal, now)
        if release is not None:
            entry.leases.pop(release, None)
        counters = entry.counters
        for name, window, reserved, delta in adjustments:
            index = now // window
            stored = counters.get(name)
            prev, curr = roll(stored[0], stored[1], stored[2], index) if stored else (0, 0)
            if delta >= 0:
                curr += delta
            elif reserved == index:
                curr = max(0, curr + delta)
            elif reserved == index - 1:
                prev = max(0, prev + delta)
            counters[name] = [index, prev, curr]
            if now + 2 * window > entry.expires_ms:
                entry.expires_ms = now + 2 * window

    async def refresh(self, principal: str, lease: str, ttl_ms: int) -> None:
        now = self._now()
        entry = self._entry(principal, now)
        entry.leases[lease] = now + ttl_ms

    async def mark_once(self, principal: str, tag: str, ttl_ms: int) -> bool:
        now = self._now()
        entry = self._entry(principal, now)
        for k in [k for k, exp in entry.marks.items() if exp <= now]:
            del entry.marks[k]
        if tag in entry.marks:
            return False
        entry.marks[tag] = now + ttl_ms
        entry.expires_ms = max(entry.expires_ms, now + ttl_ms)
        return True

    async def peek(self, principal: str, hits: Sequence[Hit]) -> tuple[WindowState, ...]:
        now = self._now()
        entry = self._entries.get(principal)
        out = []
        for hit in hits:
            index = now // hit.window_ms
            stored = entry.counters.get(hit.field) if entry else None
            prev, curr = roll(stored[0], stored[1], stored[2], index) if stored else (0, 0)
            out.append(WindowState(index, prev, curr, now - index * hit.window_ms))
        return tuple(out)

    async def in_flight(self, principal: str) -> int:
        now = self._now()
        entry = self._entries.get(principal)
        return sum(1 for exp in entry.leases.values() if exp > now) if entry else 0
