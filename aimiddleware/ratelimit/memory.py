"""In-process backend: three integers per (principal, limit), leases with expiry times.

Cost per admission is independent of the number of principals and of the tokens already
in the window: counters are sliding-window pairs (no entry per token), and idle principals
are dropped lazily, a bounded number per call, from buckets of expiry times (no scan of all
keys). Buckets, not one LRU order: with tiers of different windows (a daily limit beside
minute-only ones) an idle daily principal at the front of an LRU order held every expired
minute-only principal behind it for two days.
Each method runs without an ``await`` inside, so it is atomic on the event loop.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from math import floor
from operator import itemgetter
from typing import Any

from aimiddleware.ratelimit.backend import Adjustment, Decision, Hit, WindowState, roll
from aimiddleware.ratelimit.headers import _TAILS, HeaderPlan

__all__ = ["MemoryBackend"]

_new = tuple.__new__  # a NamedTuple from a tuple, without its Python-level __new__
_NEVER = 1 << 62  # a time (ms) after every expiry
_EMPTY = (-_NEVER, 0, 0, 0)  # a counter never used: its window is long gone
_field = itemgetter(0)  # Hit.field
_window = itemgetter(1)  # Hit.window_ms
# Indexing it returns the index (C-level): with it as ``costs``, a Hit is an acquire_rendered
# row whose last field is its (non-negative) cost itself, so Hits are passed as they are.
_OWN_COST_END = 1 << 126
_OWN_COST = range(_OWN_COST_END)  # (only for costs in [0, _OWN_COST_END): see acquire_now)
_cost = itemgetter(3)  # Hit.cost
_NO_HEADS: dict[int, bytes] = {}  # (never written: no plan, no duration cache)
_UNUSED: list[Any] = []  # (never appended to: without a plan no row renders)
_NO_HEADERS = repeat(None)  # no limit renders headers in the admission pass
_KEEP_LEASED_MS = 60_000  # an expired entry still holding leases: looked at again this late


class _Entry:
    __slots__ = ("counters", "due", "expires_ms", "lease_due", "leases", "marks")

    def __init__(self) -> None:
        # field -> (index, prev, curr, elapsed | 0): a plain tuple of ints (untracked by the gc)
        self.counters: dict[str, tuple[int, ...]] = {}
        self.leases: dict[str, int] = {}  # lease id -> expiry (ms)
        self.lease_due = _NEVER  # no lease expires before this (ms): no scan until then
        self.expires_ms = 0
        self.due = -1  # the end of the expiry bucket it is listed in (ms): >= expires_ms
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
        self._entries: dict[str, _Entry] = {}
        # Expiry buckets: bucket end (ms) -> principals listed there, and a heap of the ends.
        # A principal is listed again only when its expiry passes its bucket's end, and a
        # bucket is an eighth to a sixteenth of the entry's lifetime wide (a power of two
        # ms, so ends align): an active principal has ~10 listings pending, not one per
        # request.
        self._buckets: dict[int, list[str]] = {}
        self._ends: list[int] = []
        self._evict_at = _NEVER  # the first bucket's end: no eviction pass before it (ms)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _entry(self, principal: str, now: int, lifetime: int = 0) -> _Entry:
        """``principal``'s entry; a new one lives ``lifetime`` ms (listed at once, so one
        never given a window still goes; a caller about to extend it says by how much, so
        it is listed once)."""
        if now >= self._evict_at:
            self._evict(now)
        entry = self._entries.get(principal)
        if entry is None:
            entry = self._entries[principal] = _Entry()
            entry.expires_ms = now + lifetime
            self._list(principal, entry, lifetime)
        return entry

    def _list(self, principal: str, entry: _Entry, lifetime: int) -> None:
        """List ``principal`` in the bucket of its ``expires_ms`` (``lifetime``: how long it
        was extended by, which sets the bucket's width)."""
        width = 1 << max(10, (lifetime // 8).bit_length() - 1)  # >= ~1 s, <= lifetime / 8
        end = entry.due = (entry.expires_ms // width + 1) * width
        names = self._buckets.get(end)
        if names is None:
            names = self._buckets[end] = []
            heapq.heappush(self._ends, end)
            if end < self._evict_at:
                self._evict_at = end
        names.append(principal)

    def _evict(self, now: int, budget: int = 64) -> None:
        # The buckets that have ended, a bounded number of names per call: a name is dropped
        # if its entry is still listed there (else it was extended and listed later) and
        # holds no live lease (an expired one, whose holder died, does not keep it).
        buckets, ends, entries = self._buckets, self._ends, self._entries
        while ends and ends[0] <= now:
            end = ends[0]
            names = buckets[end]
            while names:
                if budget <= 0:
                    return  # (_evict_at stays passed: the next call goes on)
                budget -= 1
                principal = names.pop()
                entry = entries.get(principal)
                if entry is None or entry.due != end:
                    continue
                if any(exp > now for exp in entry.leases.values()):  # requests in flight:
                    entry.expires_ms = now + _KEEP_LEASED_MS  # keep it, look again later
                    self._list(principal, entry, _KEEP_LEASED_MS)
                    continue
                del entries[principal]
            heapq.heappop(ends)
            del buckets[end]
        self._evict_at = ends[0] if ends else _NEVER

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
        held: str = "",  # (in-process: nothing outlives its holder, nothing is held)
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
        span = 2 * max(map(_window, hits), default=0)
        costs: Sequence[int] = _OWN_COST
        rows: Sequence[tuple[str, int, int, int]] = hits
        if hits and not (min(map(_cost, hits)) >= 0 and max(map(_cost, hits)) < _OWN_COST_END):
            # a cost the range does not index to itself (negative: a credit; or huge)
            rows = [(hit[0], hit[1], hit[2], i) for i, hit in enumerate(hits)]
            costs = [hit[3] for hit in hits]
        return self.acquire_rendered(
            principal, rows, costs, lease, concurrency, lease_ttl_ms, span
        )[0]

    def acquire_rendered(
        self,
        principal: str,
        rows: Sequence[tuple[str, int, int, int]],
        costs: Sequence[int],
        lease: str | None,
        concurrency: int,
        lease_ttl_ms: int,
        span: int,
        plan: HeaderPlan | None = None,
    ) -> tuple[Decision, list[tuple[bytes, bytes]] | None]:
        """:meth:`acquire_now` of the hits ``Hit(field, window_ms, limit, costs[i])`` for each
        row ``(field, window_ms, limit, i)`` (no Hit built), and with a ``plan`` the admitted
        response's headers (``plan.render(decision.states, decision.in_flight)``), rendered in
        the same pass over the counters when the plan allows it. ``span``: twice the longest
        window (ms)."""
        now = int(self.clock() * 1000)
        entry = self._entries.get(principal)  # self._entry(principal, now, span), inlined
        if entry is None or now >= self._evict_at:
            entry = self._entry(principal, now, span)
        counters = entry.counters
        states: list[WindowState] = []  # as they will be once charged
        failed = -1
        fused: Iterable[tuple[Any, ...] | None]
        if plan is None:  # (acquire_now: nothing rendered, so nothing allocated for it)
            fused, heads, out, args = _NO_HEADERS, _NO_HEADS, _UNUSED, _UNUSED
        else:
            fused = _NO_HEADERS if plan.fused is None else plan.fused
            heads = plan._heads  # whole seconds -> Go duration head
            out = []  # the headers, when fused
            args = []  # the RateLimit template's values, when fused
        for (name, window, limit, i), spec in zip(rows, fused):  # noqa: B905 (same length)
            cost = costs[i]
            index = now // window
            # backend.roll and backend.fits, inlined (the same float expression as the Lua).
            at, prev, curr, _ = counters.get(name, _EMPTY)
            if at != index:
                prev, curr = (curr, 0) if at == index - 1 else (0, 0)
            elapsed = now - index * window
            # float(prev) * float(window - elapsed) / float(window) + float(curr) + float(cost)
            # <= float(limit): a float op int converts the int exactly as float() does.
            weighted = prev * float(window - elapsed) / window
            if not (weighted + curr + cost <= float(limit)) and failed < 0:  # (usually fits)
                failed = len(states)
            curr += cost
            states.append(_new(WindowState, (index, prev, curr, elapsed)))
            if spec is not None:  # HeaderPlan.render's row for this limit, fused
                f_amount, h_limit, h_remaining, h_reset = spec
                # backend.remaining and headers.reset_ms of the charged state
                left = floor(f_amount - (weighted + curr))
                if left < 0:
                    left = 0
                reset = 2 * window - elapsed if curr > 0 else (window - elapsed if prev > 0 else 0)
                args += (left, -(-reset // 1000))  # (one list.extend rather than two appends)
                if h_limit is not None:
                    head = heads.get(reset // 1000)
                    duration = (
                        plan._duration(reset)  # type: ignore[union-attr]
                        if head is None
                        else head + _TAILS[reset % 1000]
                    )
                    out += (h_limit, (h_remaining, b"%d" % left), (h_reset, duration))
        in_flight = 0
        if concurrency > 0:
            leases = entry.leases
            if leases and now >= entry.lease_due:  # one may have expired: drop the expired
                for k in [k for k, exp in leases.items() if exp <= now]:
                    del leases[k]
                entry.lease_due = min(leases.values(), default=_NEVER)
            in_flight = len(leases)
            if failed < 0 and in_flight >= concurrency:
                failed = len(rows)
        if now + span > entry.expires_ms:
            entry.expires_ms = now + span
            if now + span > entry.due:  # (past its bucket: listed again, seldom)
                self._list(principal, entry, span)
        if failed >= 0:  # nothing charged: report the counters as they are
            refused = tuple([
                _new(WindowState, (s[0], s[1], s[2] - costs[row[3]], s[3]))
                for row, s in zip(rows, states, strict=True)
            ])
            return _new(Decision, (False, failed, refused, in_flight, now)), None
        # counters[hit.field] = state for each, in order (C-level: no Python loop), kept as
        # a plain tuple: the garbage collector untracks a tuple of ints (and then the dict of
        # an idle principal), never a WindowState, so every full collection walked them all
        counters.update(zip(map(_field, rows), map(tuple, states)))  # noqa: B905 (same length)
        if concurrency > 0 and lease is not None:
            expiry = entry.leases[lease] = now + lease_ttl_ms
            if expiry < entry.lease_due:
                entry.lease_due = expiry
            in_flight += 1
        decision = _new(Decision, (True, -1, tuple(states), in_flight, now))
        if plan is None:
            return decision, None
        if fused is _NO_HEADERS:  # the plan needs every row first
            return decision, plan.render(states, in_flight)
        if plan._policy is not None:  # the end of HeaderPlan.render
            if plan._concurrency:
                left = plan._concurrency - in_flight
                args.append(left if left > 0 else 0)
            out += (plan._policy, (b"ratelimit", plan._template % tuple(args)))
        return decision, out

    async def adjust(
        self, principal: str, adjustments: Sequence[Adjustment], *, release: str | None = None
    ) -> None:
        self.adjust_now(principal, adjustments, release)

    def adjust_now(
        self,
        principal: str,
        adjustments: Sequence[tuple[str, int, int, int, int]],  # Adjustment or the same tuple
        release: str | None = None,
    ) -> None:
        # Each adjustment as a reconcile_now row: nothing reserved, its delta used.
        self.reconcile_now(
            principal,
            [(adj[0], adj[1], 0, 0) for adj in adjustments],
            [(adj[2],) for adj in adjustments],
            range(len(adjustments)),
            (0,),
            [adj[3] for adj in adjustments],
            release,
        )

    def reconcile_now(
        self,
        principal: str,
        rows: Sequence[tuple[str, int, int, int]],  # (field, window ms, limit, i)
        states: Sequence[tuple[int, ...]],  # WindowState, or a tuple of its window number
        codes: Sequence[int],
        reserved: Sequence[int],
        used: Sequence[int],
        release: str | None = None,
    ) -> None:
        """Correct each row's reservation (``reserved[i]``, made in fixed window number
        ``state[0]``) to ``used[code]`` (``codes``: one per row), and release the lease
        ``release``: :meth:`adjust_now` computing its adjustments in the same pass (no list)."""
        now = int(self.clock() * 1000)
        entry = self._entries.get(principal)  # self._entry(principal, now), inlined
        if entry is None or now >= self._evict_at:
            entry = self._entry(principal, now)
        if release is not None:
            entry.leases.pop(release, None)
        counters = entry.counters
        for (name, window, _, i), state, code in zip(rows, states, codes):  # noqa: B905
            delta = used[code] - reserved[i]  # negative refunds, positive charges
            if not delta:  # usage equal to the reservation: nothing to correct
                continue
            index = now // window
            at, prev, curr, _ = counters.get(name, _EMPTY)  # backend.roll, inlined
            if at != index:
                prev, curr = (curr, 0) if at == index - 1 else (0, 0)
            if delta > 0:  # an extra charge goes to the current window
                curr += delta
            elif state[0] == index:  # a refund goes to the window reserved in, if counted
                curr += delta
                if curr < 0:
                    curr = 0
            elif state[0] == index - 1:
                prev += delta
                if prev < 0:
                    prev = 0
            counters[name] = (index, prev, curr, 0)
            if now + 2 * window > entry.expires_ms:
                entry.expires_ms = now + 2 * window
                if now + 2 * window > entry.due:
                    self._list(principal, entry, 2 * window)

    async def refresh(
        self,
        principal: str,
        lease: str,
        ttl_ms: int,
        *,
        concurrent: bool = True,
        held: bool = False,
    ) -> None:
        if not concurrent:  # (held reservations: none in-process)
            return
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
        if now + ttl_ms > entry.expires_ms:
            entry.expires_ms = now + ttl_ms
            if now + ttl_ms > entry.due:
                self._list(principal, entry, ttl_ms)
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
