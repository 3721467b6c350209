"""The usage ledger: records aggregated per principal, day (UTC) and model, plus feedback.

:class:`Ledger` is the base every backend builds on. Backends (same behaviour, same tests),
one module each: :class:`~aimiddleware.usage.ledger_memory.MemoryLedger` (embedded default,
bounded), :class:`~aimiddleware.usage.ledger_sqlite.SQLiteLedger` (durable, one host) and
:class:`~aimiddleware.usage.ledger_redis.RedisLedger` (shared by every worker). What they
store and return is in :mod:`aimiddleware.usage.records`; this module re-exports it, and
``MemoryLedger``.

Every backend stores flat integer counters per (principal, day, model): ``requests``, the
token fields of :class:`Usage`, ``cost_nanos`` (cost in 1e-9 units, exact integer adds),
``unpriced`` (requests with no price) and ``fr:<finish_reason>``, ``feedback_count``,
``rating_sum``. Writing never fails the response: :meth:`Ledger.record` logs a failed write
and keeps it (bounded) for retry on the next write or :meth:`Ledger.flush`; a record carries
a unique ``record_id`` so a retried write that had in fact landed is not counted twice.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
from datetime import date
from typing import TYPE_CHECKING, Any

import anyio

from aimiddleware.errors import StoreUnavailable
from aimiddleware.usage.records import NANOS as NANOS
from aimiddleware.usage.records import TOKEN_FIELDS as TOKEN_FIELDS
from aimiddleware.usage.records import UNKNOWN_MODEL as UNKNOWN_MODEL
from aimiddleware.usage.records import (
    Feedback,
    RequestRecord,
    UsageAggregate,
    UsageRecord,
    aggregate_from_counters,
    counters_for,
    new_record_id,
    utc_day,
)

if TYPE_CHECKING:
    from aimiddleware.usage.ledger_memory import MemoryLedger

__all__ = [
    "Feedback",
    "Ledger",
    "MemoryLedger",
    "RequestRecord",
    "UsageAggregate",
    "UsageRecord",
    "aggregate_from_counters",
    "counters_for",
    "new_record_id",
    "utc_day",
]

logger = logging.getLogger("aimiddleware.usage")


class Ledger(abc.ABC):
    """Base: the retry buffer around a backend's ``_write``; subclasses do the storage."""

    #: Whether a write does I/O (and so needs a timeout, and shielding from cancellation).
    does_io = True

    def __init__(
        self, *, write_timeout: float = 2.0, retry_interval: float = 1.0, max_pending: int = 10_000
    ) -> None:
        if write_timeout <= 0 or retry_interval < 0 or max_pending < 1:
            raise ValueError("write_timeout > 0, retry_interval >= 0 and max_pending >= 1")
        self.write_timeout = write_timeout
        self.retry_interval = retry_interval
        self._pending: collections.deque[UsageRecord] = collections.deque(maxlen=max_pending)
        self._failed_at = 0.0
        # One flush at a time, the buffer drained in order. A thread lock taken without
        # blocking: a Ledger may be shared by threads with event loops of their own (an
        # anyio.Lock's waiter would then never be woken).
        self._flushing = threading.Lock()

    @property
    def pending(self) -> int:
        """Records whose write failed and waits for a retry."""
        return len(self._pending)

    async def record(self, rec: UsageRecord) -> None:
        """Store ``rec``; never raises. A failure is logged and the record kept for retry."""
        if self._pending and time.monotonic() - self._failed_at < self.retry_interval:
            self._keep(rec)
            return
        if self._pending and (self._flushing.locked() or not await self.flush()):
            self._keep(rec)  # (behind the others: a running flush writes it too, in order)
            return
        if not await self._try(rec):
            self._keep(rec)

    async def flush(self) -> bool:
        """Retry pending writes in order; ``True`` when none is left.

        One flush runs at a time: several requests finishing as the store came back each
        wrote the oldest record and then each dropped one, records never written among them
        (and an empty buffer's ``popleft`` raised)."""
        while not self._flushing.acquire(blocking=False):  # noqa: ASYNC110 - (another flush
            # runs, maybe on another thread's loop: no event can wake this one)
            await anyio.sleep(0.01)
        try:
            while self._pending:
                rec = self._pending[0]
                if not await self._try(rec):
                    return False
                if self._pending and self._pending[0] is rec:  # (not pushed out meanwhile)
                    self._pending.popleft()
            return True
        finally:
            self._flushing.release()

    def _keep(self, rec: UsageRecord) -> None:
        if len(self._pending) == self._pending.maxlen:
            logger.error("usage ledger retry buffer full: dropping record %s", self._pending[0])
        self._pending.append(rec)

    async def _try(self, rec: UsageRecord) -> bool:
        try:
            if self.does_io:
                with anyio.fail_after(self.write_timeout):
                    await self._write(rec)
            else:
                await self._write(rec)
        except Exception as exc:
            if not self.transient(exc):
                # A record this store can never take (say a count past its integer range)
                # would block every later one behind it: log it whole and go on.
                logger.error("usage ledger cannot store %r; dropped", rec, exc_info=True)
                return True
            self._failed(rec)
            return False
        return True

    def transient(self, exc: Exception) -> bool:
        """Is ``exc`` a store that is down or slow (keep the record and retry)? Backends
        add their own client's errors."""
        return isinstance(exc, (StoreUnavailable, TimeoutError, OSError))

    def _failed(self, rec: UsageRecord) -> None:
        self._failed_at = time.monotonic()
        logger.warning("usage ledger write failed for %s; will retry", rec.request_id,
                       exc_info=True)

    @abc.abstractmethod
    async def _write(self, rec: UsageRecord) -> None:
        """Implemented by each backend."""

    @abc.abstractmethod
    async def query(
        self,
        principal: str,
        *,
        start: date | None = None,
        end: date | None = None,
        model: str | None = None,
    ) -> list[UsageAggregate]:
        """The principal's aggregates by day and model, oldest first, ``start..end`` inclusive."""

    @abc.abstractmethod
    async def get_request(self, principal: str, request_id: str) -> RequestRecord | None:
        """Implemented by each backend."""

    @abc.abstractmethod
    async def add_feedback(self, principal: str, feedback: Feedback) -> bool:
        """Attach feedback to the principal's own request; ``False`` if no such request."""

    async def aclose(self) -> None:
        await self.flush()


def __getattr__(name: str) -> Any:
    # MemoryLedger is built on Ledger above, so it is imported from here only when asked for
    if name == "MemoryLedger":
        from aimiddleware.usage.ledger_memory import MemoryLedger

        return MemoryLedger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
