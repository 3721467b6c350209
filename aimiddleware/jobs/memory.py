"""In-process :class:`~aimiddleware.jobs.store.JobStore`: one worker, nothing to run.

Records (with their events, flags, results and idempotency key) and finished webhook
deliveries are dropped ``ttl`` seconds after creation (finish), checked as new ones arrive
and as deliveries are claimed.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Sequence

import anyio

from aimiddleware.jobs.store import Event, JobFenced

__all__ = ["MemoryJobStore"]


class MemoryJobStore:
    """Dicts and lists; every operation completes between two awaits, so it is atomic."""

    def __init__(self, poll_interval: float = 0.02, *, ttl: float = 7 * 86400) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.poll_interval = poll_interval
        self.ttl = ttl
        self._expiry: deque[tuple[float, str, str, str | None]] = deque()
        self._done_expiry: deque[tuple[float, str]] = deque()
        self._records: dict[tuple[str, str], str] = {}
        self._events: dict[tuple[str, str], list[Event]] = {}
        self._cancel: set[tuple[str, str]] = set()
        self._reaped: dict[tuple[str, str], float] = {}  # claim -> its expiry (monotonic)
        self._fenced: set[tuple[str, str]] = set()  # records a reaper reported lost
        self._beats: dict[tuple[str, str], float] = {}
        self._results: dict[tuple[str, str], list[str]] = {}
        self._idem: dict[tuple[str, str], str] = {}
        self._outbox: dict[str, str] = {}
        self._due: dict[str, float] = {}  # pending delivery -> due time (or its lease's end)
        self._host: dict[str, str] = {}  # pending delivery -> its receiver's host
        # host -> a heap of (due, delivery), an entry stale once _due says otherwise
        self._queues: dict[str, list[tuple[float, str]]] = {}
        self._busy: dict[str, dict[str, float]] = {}  # host -> leased delivery -> lease end

    async def create(
        self, principal: str, rec_id: str, data: str, idem_key: str | None
    ) -> tuple[str, str]:
        self._prune()
        if idem_key is not None:
            owner = self._idem.get((principal, idem_key))
            if owner is not None and (principal, owner) in self._records:
                return owner, self._records[(principal, owner)]
            self._idem[(principal, idem_key)] = rec_id
        self._records[(principal, rec_id)] = data
        self._expiry.append((time.monotonic() + self.ttl, principal, rec_id, idem_key))
        return rec_id, data

    def _prune(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            _, principal, rec_id, idem_key = self._expiry.popleft()
            key = (principal, rec_id)
            for table in (self._records, self._events, self._beats, self._results):
                table.pop(key, None)
            self._cancel.discard(key)
            self._fenced.discard(key)
            self._reaped.pop(key, None)
            if idem_key is not None and self._idem.get((principal, idem_key)) == rec_id:
                del self._idem[(principal, idem_key)]
        while self._done_expiry and self._done_expiry[0][0] <= now:
            _, delivery_id = self._done_expiry.popleft()
            if delivery_id not in self._due:
                self._outbox.pop(delivery_id, None)

    async def get(self, principal: str, rec_id: str) -> str | None:
        return self._records.get((principal, rec_id))

    def _check(self, principal: str, rec_id: str, worker: bool) -> None:
        if worker and (principal, rec_id) in self._fenced:
            raise JobFenced(rec_id)

    async def put(
        self, principal: str, rec_id: str, data: str, *, worker: bool = False
    ) -> None:
        self._check(principal, rec_id, worker)
        self._records[(principal, rec_id)] = data

    async def append_event(
        self, principal: str, rec_id: str, event: str, data: str, *, worker: bool = False
    ) -> str:
        self._check(principal, rec_id, worker)
        log = self._events.setdefault((principal, rec_id), [])
        event_id = str(len(log) + 1)
        log.append((event_id, event, data))
        return event_id

    async def read_events(
        self, principal: str, rec_id: str, after: str | None, wait: float
    ) -> list[Event]:
        start = _position(after)
        deadline = time.monotonic() + wait
        while True:
            log = self._events.get((principal, rec_id), [])
            if len(log) > start:
                return log[start:]
            if time.monotonic() >= deadline:
                return []
            await anyio.sleep(self.poll_interval)

    async def resume_point(self, principal: str, rec_id: str, after: str) -> str | None:
        n = _position(after)
        return after if 0 < n <= len(self._events.get((principal, rec_id), ())) else None

    async def request_cancel(self, principal: str, rec_id: str) -> None:
        self._cancel.add((principal, rec_id))

    async def cancel_requested(self, principal: str, rec_id: str) -> bool:
        return (principal, rec_id) in self._cancel

    async def should_stop(self, principal: str, rec_id: str) -> bool:
        return (principal, rec_id) in self._cancel or (principal, rec_id) in self._fenced

    async def beat(self, principal: str, rec_id: str, ttl: float) -> None:
        self._beats[(principal, rec_id)] = time.monotonic() + ttl

    async def alive(self, principal: str, rec_id: str) -> bool:
        return self._beats.get((principal, rec_id), 0.0) > time.monotonic()

    async def claim_run(self, principal: str, rec_id: str, data: str, ttl: float) -> bool:
        key, now = (principal, rec_id), time.monotonic()
        if self._records.get(key) != data or self._beats.get(key, 0.0) > now:
            return False
        self._beats[key] = now + ttl
        return True

    async def claim_reap(self, principal: str, rec_id: str, ttl: float) -> bool:
        now = time.monotonic()
        if self._reaped.get((principal, rec_id), 0.0) > now:
            return False
        self._reaped[(principal, rec_id)] = now + ttl
        self._fenced.add((principal, rec_id))
        return True

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None:
        self._check(principal, rec_id, worker)
        self._results.setdefault((principal, rec_id), []).append(line)

    async def append_results(
        self, principal: str, rec_id: str, lines: Sequence[str], *, worker: bool = False
    ) -> None:
        self._check(principal, rec_id, worker)
        self._results.setdefault((principal, rec_id), []).extend(lines)

    async def results(self, principal: str, rec_id: str) -> list[str]:
        return list(self._results.get((principal, rec_id), []))

    async def outbox_put(self, delivery_id: str, data: str, next_at: float, host: str) -> None:
        self._release(delivery_id)
        self._outbox[delivery_id] = data
        self._schedule(delivery_id, next_at, host)

    async def outbox_done(self, delivery_id: str, data: str) -> None:
        self._prune()
        self._release(delivery_id)
        self._outbox[delivery_id] = data
        self._due.pop(delivery_id, None)
        self._host.pop(delivery_id, None)
        self._done_expiry.append((time.monotonic() + self.ttl, delivery_id))

    def _schedule(self, delivery_id: str, at: float, host: str) -> None:
        self._due[delivery_id] = at
        self._host[delivery_id] = host
        heapq.heappush(self._queues.setdefault(host, []), (at, delivery_id))

    def _release(self, delivery_id: str) -> None:
        """The attempt of ``delivery_id`` in flight, if any, is over: its host's slot frees."""
        busy = self._busy.get(self._host.get(delivery_id, ""))
        if busy is not None:
            busy.pop(delivery_id, None)

    def _first(self, host: str) -> float | None:
        """When the host's first pending delivery is due (stale heap entries dropped)."""
        queue = self._queues[host]
        while queue and self._due.get(queue[0][1]) != queue[0][0]:
            heapq.heappop(queue)
        if not queue:
            del self._queues[host]
            return None
        return queue[0][0]

    async def outbox_claim(
        self, now: float, lease: float, limit: int, per_host: int
    ) -> list[str]:
        # Per host, as on Redis: a host at its cap costs one look, however many are due.
        self._prune()
        for host, busy in list(self._busy.items()):  # leases that ended (a dispatcher died)
            for delivery_id in [d for d, end in busy.items() if end <= now]:
                del busy[delivery_id]
            if not busy:
                del self._busy[host]
        ready = []
        for host in list(self._queues):
            first = self._first(host)
            if first is not None and first <= now and len(self._busy.get(host, ())) < per_host:
                ready.append((first, host))
        claimed: list[str] = []
        for _, host in sorted(ready):  # oldest due host first
            busy = self._busy.setdefault(host, {})
            while len(claimed) < limit and len(busy) < per_host:
                first = self._first(host)
                if first is None or first > now:
                    break
                delivery_id = self._queues[host][0][1]
                busy[delivery_id] = now + lease
                self._schedule(delivery_id, now + lease, host)  # (its due entry goes stale)
                claimed.append(self._outbox[delivery_id])
        return claimed

    async def outbox_get(self, delivery_id: str) -> str | None:
        return self._outbox.get(delivery_id)


def _position(after: str | None) -> int:
    """Index of the first event after ``after`` (an unknown id replays from the start)."""
    if after is None:
        return 0
    try:
        n = int(after)
    except ValueError:
        return 0
    return n if 0 <= n < math.inf else 0
