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
from operator import itemgetter

from aimiddleware.ratelimit.backend import Adjustment, Decision, Hit, WindowState, roll

__all__ = ["MemoryBackend"]

_new = tuple.__new__  # a NamedTuple from a tuple, without its Python-level __new__
_NEVER = 1 << 62  # a time (ms) after every expiry
_EMPTY = (-_NEVER, 0, 0, 0)  # a counter never used: its window is long gone
_field = itemgetter(0)  # Hit.field


class _Entry:
    __slots__ = ("counters", "expires_ms", "lease_due", "leases", "marks")

    def __init__(self) -> None:
        # field -> (index, prev, curr, elapsed | 0): immutable, so a WindowState is stored as is
        self.counters: dict[str, tuple[int, ...]] = {}
        self.leases: dict[str, int] = {}  # lease id -> expiry (ms)
        self.lease_due = _NEVER  # no lease expires before this (ms): no scan until then
        self.expires_ms = 0
        self.marks: dict[str, int] = {}  # alert tag -> expiry (ms)


class MemoryBackend:
    """The embedded default. ``clock`` returns seconds (``time.time`` by default).

    The ``*_now`` methods are the synchronous cores of ``acquire`` and ``adjust`` (nothing in
    them awaits): the limiter calls them directly to save a coroutine per request.
    """

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
        return self.acquire_now(principal, hits, lease, concurrency, lease_ttl_ms)

    def acquire_now(
        self,
        principal: str,
        hits: Sequence[Hit],
        lease: str | None = None,
        concurrency: int = 0,
        lease_ttl_ms: int = 0,
    ) -> Decision:
        now = int(self.clock() * 1000)
        entry = self._entries.get(principal)  # self._entry(principal, now), inlined
        if entry is None or now >= self._evict_at:
            entry = self._entry(principal, now)
        else:
            self._entries.move_to_end(principal)
        counters = entry.counters
        states: list[WindowState] = []  # as they will be once charged
        failed = -1
        longest = 0
        for name, window, limit, cost in hits:
            index = now // window
            # backend.roll and backend.fits, inlined (the same float expression as the Lua).
            at, prev, curr, _ = counters.get(name, _EMPTY)
            if at != index:
                prev, curr = (curr, 0) if at == index - 1 else (0, 0)
            elapsed = now - index * window
            # float(prev) * float(window - elapsed) / float(window) + float(curr) + float(cost)
            # <= float(limit): a float op int converts the int exactly as float() does.
            if failed < 0 and not (
                prev * float(window - elapsed) / window + curr + cost <= float(limit)
            ):
                failed = len(states)
            states.append(_new(WindowState, (index, prev, curr + cost, elapsed)))
            if window > longest:
                longest = window
        in_flight = 0
        if concurrency > 0:
            leases = entry.leases
            if leases and now >= entry.lease_due:  # one may have expired: drop the expired
                for k in [k for k, exp in leases.items() if exp <= now]:
                    del leases[k]
                entry.lease_due = min(leases.values(), default=_NEVER)
            in_flight = len(leases)
            if failed < 0 and in_flight >= concurrency:
                failed = len(hits)
        if now + 2 * longest > entry.expires_ms:
            entry.expires_ms = now + 2 * longest
        if failed >= 0:  # nothing charged: report the counters as they are
            refused = tuple([
                _new(WindowState, (s[0], s[1], s[2] - hit[3], s[3]))
                for hit, s in zip(hits, states, strict=True)
            ])
            return _new(Decision, (False, failed, refused, in_flight, now))
        # counters[hit.field] = state for each, in order (C-level: no Python loop)
        counters.update(zip(map(_field, hits), states))  # noqa: B905 (same length)
        if concurrency > 0 and lease is not None:
            expiry = entry.leases[lease] = now + lease_ttl_ms
            if expiry < entry.lease_due:
                entry.lease_due = expiry
            in_flight += 1
        return _new(Decision, (True, -1, tuple(states), in_flight, now))

    async def adjust(
        self, principal: str, adjustments: Sequence[Adjustment], *, release: str | None = None
    ) -> None:
        self.adjust_now(principal, adjustments, release)

    def adjust_now(
        self,
        principal: str,
        adjustments: Sequence[tuple[str, int, int, int]],  # Adjustment or the same plain tuple
        release: str | None = None,
    ) -> None:
        now = int(self.clock() * 1000)
        entry = self._entries.get(principal)  # self._entry(principal, now), inlined
        if entry is None or now >= self._evict_at:
            entry = self._entry(principal, now)
        else:
            self._entries.move_to_end(principal)
        if release is not None:
            entry.leases.pop(release, None)
        counters = entry.counters
        for name, window, reserved, delta in adjustments:
            index = now // window
            at, prev, curr, _ = counters.get(name, _EMPTY)  # backend.roll, inlined
            if at != index:
                prev, curr = (curr, 0) if at == index - 1 else (0, 0)
            if delta >= 0:
                curr += delta
            elif reserved == index:
                curr = max(0, curr + delta)
            elif reserved == index - 1:
                prev = max(0, prev + delta)
            counters[name] = (index, prev, curr, 0)
            if now + 2 * window > entry.expires_ms:
                entry.expires_ms = now + 2 * window

    async def refresh(self, principal: str, lease: str, ttl_ms: int) -> None:
        now = self._now()
        entry = self._entry(principal, now)
        expiry = entry.leases[lease] = now + ttl_ms
        if expiry < entry.lease_due:
            entry.lease_due = expiry

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
