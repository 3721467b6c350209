"""Where jobs live: the :class:`JobStore` protocol and the factory picking a backend.

A store keeps, per principal and record id (a job or a batch): the record as JSON, an
append-only event log (the SSE stream replays and resumes from it), a cancel flag (so a
``DELETE`` served by any worker reaches the worker running the job), a liveness lease
(so a job whose worker died is reported, not left running forever) with a claim that lets
exactly one reader report it and a fence that refuses the lost worker's writes from then on
(a worker cut off from the store past its lease is alive, and comes back), batch result lines,
and the idempotency map ``(principal, key) -> id``. Webhook deliveries sit in an outbox
that any dispatcher can claim with a lease, so a restart loses none; each names its
receiver's host, and a claim takes no more than a cap of attempts in flight per host (held
by every dispatcher on the store together), so one slow receiver cannot take every slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aimiddleware.storage import Storage

__all__ = ["Event", "JobFenced", "JobStore", "make_store"]

Event = tuple[str, str, str]
"""(event id, event type, JSON data)."""


class JobFenced(Exception):
    """A write by the worker running a record that a reaper has since reported lost: the
    record is no longer that worker's to write (its client was told it failed)."""


class JobStore(Protocol):
    async def create(
        self, principal: str, rec_id: str, data: str, idem_key: str | None
    ) -> tuple[str, str]:
        """Store a new record unless ``idem_key`` already maps to one (atomically).

        Returns the (id, JSON) of the record that owns the key: the new one, or the earlier
        one when this is a retry.
        """

    async def get(self, principal: str, rec_id: str) -> str | None: ...

    async def put(
        self, principal: str, rec_id: str, data: str, *, worker: bool = False
    ) -> None:
        """Replace the record. ``worker``: a write by the worker running it, refused with
        :class:`JobFenced` once :meth:`claim_reap` has fenced the record (as are the event
        and result writes below)."""

    async def append_event(
        self, principal: str, rec_id: str, event: str, data: str, *, worker: bool = False
    ) -> str:
        """Append to the record's event log; returns the new event id."""

    async def read_events(
        self, principal: str, rec_id: str, after: str | None, wait: float
    ) -> list[Event]:
        """Events after ``after`` (all when None), waiting up to ``wait`` s for the first."""

    async def resume_point(self, principal: str, rec_id: str, after: str) -> str | None:
        """``after`` if it is a place in the record's event log, else None (replay from the
        start): a malformed id, or one past the last event logged, which this log never
        sent (another job's, mistyped, or from a log since lost) and whose wait for an
        event after it would show the client nothing until the record ends."""

    async def request_cancel(self, principal: str, rec_id: str) -> None: ...

    async def cancel_requested(self, principal: str, rec_id: str) -> bool: ...

    async def should_stop(self, principal: str, rec_id: str) -> bool:
        """Whether the worker running the record is to stop: a cancel was requested or the
        record is fenced (in one round trip: the worker polls this)."""

    async def beat(self, principal: str, rec_id: str, ttl: float) -> None:
        """The worker running the record is alive for ``ttl`` more seconds."""

    async def alive(self, principal: str, rec_id: str) -> bool:
        """Whether a worker beat for the record within its last ``ttl``."""

    async def claim_run(self, principal: str, rec_id: str, data: str, ttl: float) -> bool:
        """Whether this caller is the one to run the record: True for one caller (atomically,
        across workers) while the record is still ``data`` (as the caller read it, queued)
        and no worker holds its lease, which the winner then holds for ``ttl`` s (renewed by
        :meth:`beat` as it runs). A task queue's message delivered twice at once runs once."""

    async def claim_reap(self, principal: str, rec_id: str, ttl: float) -> bool:
        """Whether this caller is the one to report the record's lost worker: True for one
        caller (atomically, across workers) per ``ttl`` seconds, False for the others. The
        claim lapses so that a reaper that failed half-way is taken over. The winner also
        fences the record, for its retention: the lost worker's writes are refused."""

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None: ...

    async def append_results(
        self, principal: str, rec_id: str, lines: Sequence[str], *, worker: bool = False
    ) -> None:
        """Append many result lines in order, in a few round trips (not one per line)."""

    async def results(self, principal: str, rec_id: str) -> list[str]: ...

    async def outbox_put(self, delivery_id: str, data: str, next_at: float, host: str) -> None:
        """Add or update a delivery to ``host`` (its receiver's ``host:port``), due at
        ``next_at`` (unix seconds); an attempt of it that was in flight is over."""

    async def outbox_done(self, delivery_id: str, data: str) -> None:
        """Record a finished delivery (kept for history, no longer due, dropped ``ttl`` s
        later); an attempt of it that was in flight is over."""

    async def outbox_claim(
        self, now: float, lease: float, limit: int, per_host: int
    ) -> list[str]:
        """Up to ``limit`` due deliveries, oldest host first, each leased for ``lease`` s so
        no other dispatcher takes it. A host whose leased deliveries (attempts in flight,
        until put back or done, or their lease ends) number ``per_host`` gets none: its due
        ones wait, untouched, while the others' are claimed."""

    async def outbox_get(self, delivery_id: str) -> str | None: ...


def make_store(storage: Storage, *, ttl: float = 7 * 86400) -> JobStore:
    """The backend for ``storage``: in-process for ``memory://``, else Redis/Valkey."""
    if storage.is_memory:
        from aimiddleware.jobs.memory import MemoryJobStore

        return MemoryJobStore(ttl=ttl)
    from aimiddleware.jobs.redis import RedisJobStore

    return RedisJobStore(storage, ttl=ttl)
