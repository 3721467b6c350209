"""The usage ledger: records aggregated per principal, day (UTC) and model, plus feedback.

Backends (same behaviour, same tests): :class:`MemoryLedger` (embedded default, bounded),
:class:`~aimiddleware.usage.ledger_sqlite.SQLiteLedger` (durable, one host) and
:class:`~aimiddleware.usage.ledger_redis.RedisLedger` (shared by every worker).

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
import functools
import logging
import operator
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field

from aimiddleware.errors import StoreUnavailable
from aimiddleware.usage.models import _FIVE, _FIVE_SET, _SIX, Usage, trusted

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

NANOS = Decimal(1_000_000_000)
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)
UNKNOWN_MODEL = "unknown"


_EPOCH = date(1970, 1, 1)


@functools.lru_cache(maxsize=64)
def _day(index: int) -> str:
    return (_EPOCH + timedelta(days=index)).isoformat()


def utc_day(ts: float) -> str:
    """The UTC day (``YYYY-MM-DD``) of a POSIX timestamp."""
    return _day(int(ts // 86400))


def new_record_id() -> str:
    """128 random bits as hex (what ``uuid4().hex`` gives, a quarter of its cost; fork-safe)."""
    return os.urandom(16).hex()


class UsageRecord(BaseModel):
    """One finished request, as the usage layer records it."""

    model_config = ConfigDict(frozen=True)

    principal: str
    request_id: str
    model: str | None = None
    model_version: str | None = None
    usage: Usage = Field(default_factory=Usage)
    estimated_cost: Decimal | None = None
    finish_reason: str | None = None
    raw_finish_reason: str | None = None
    status: int | None = None
    duration_ms: float | None = None
    timestamp: float = Field(default_factory=time.time)
    record_id: str = Field(default_factory=new_record_id)

    @classmethod
    def of(
        cls,
        *,
        principal: str,
        request_id: str,
        model: str | None,
        model_version: str | None,
        usage: Usage,
        estimated_cost: Decimal | None,
        finish_reason: str | None,
        raw_finish_reason: str | None,
        status: int | None,
        duration_ms: float | None,
        timestamp: float,
    ) -> UsageRecord:
        """The record, built without re-validation when every value already has its type
        (the usage layer's per-request path); validated like ``UsageRecord(...)`` otherwise."""
        values: dict[str, Any] = {
            "principal": principal,
            "request_id": request_id,
            "model": model,
            "model_version": model_version,
            "usage": usage,
            "estimated_cost": estimated_cost,
            "finish_reason": finish_reason,
            "raw_finish_reason": raw_finish_reason,
            "status": status,
            "duration_ms": duration_ms,
            "timestamp": timestamp,
        }
        if _plain(principal, request_id, model, model_version, usage, estimated_cost,
                  finish_reason, raw_finish_reason, status, duration_ms, timestamp):
            values["record_id"] = new_record_id()
            return trusted(cls, values, _RECORD_ARGS)
        return cls(**values)

    @property
    def day(self) -> str:
        return utc_day(self.timestamp)

    @property
    def model_key(self) -> str:
        return self.model or UNKNOWN_MODEL


_RECORD_ARGS = frozenset(UsageRecord.model_fields) - {"record_id"}


def _plain(
    principal: object, request_id: object, model: object, model_version: object,
    usage: object, estimated_cost: object, finish_reason: object, raw_finish_reason: object,
    status: object, duration_ms: object, timestamp: object,
) -> bool:
    """Whether every value already has its field's type (no validation needed)."""
    return (
        type(principal) is str
        and type(request_id) is str
        and (model is None or type(model) is str)
        and (model_version is None or type(model_version) is str)
        and type(usage) is Usage
        and (estimated_cost is None or type(estimated_cost) is Decimal)
        and (finish_reason is None or type(finish_reason) is str)
        and (raw_finish_reason is None or type(raw_finish_reason) is str)
        and (status is None or type(status) is int)
        and (duration_ms is None or type(duration_ms) is float)
        and type(timestamp) is float
    )


#: One finished request as :meth:`MemoryLedger.record_values` takes it: the arguments of
#: :meth:`UsageRecord.of` in their order, ``duration_ms`` not yet rounded (to 3 places).
RecordValues = tuple[
    str, str, str | None, str | None, Usage, Decimal | None, str | None, str | None,
    int | None, float | None, float,
]


# A stored row holds its Usage as plain ints: a tuple of atomic values is untracked by the
# garbage collector, so 100k kept requests do not make every full collection walk them.
_FIELD_SETS: tuple[frozenset[str], ...] = (frozenset(), _FIVE, _SIX)
_token_values = operator.itemgetter(*TOKEN_FIELDS)  # of a Usage's __dict__, in C
_tokens = operator.attrgetter(*TOKEN_FIELDS)  # of any Usage


def _pack(usage: Usage) -> tuple[int, ...] | Usage:
    """``usage`` as a row keeps it: its TOKEN_FIELDS values, then the code of its fields set
    unless that is the shared ``_FIVE_SET`` (the usual Usage: six values only, one C call);
    a Usage set some other way, or not a Usage as such, is kept as it is."""
    if type(usage) is Usage:
        fields = usage.__pydantic_fields_set__
        if fields is _FIVE_SET:
            return _token_values(usage.__dict__)  # type: ignore[no-any-return]
        code = 1 if fields == _FIVE else 2 if fields == _SIX else None if fields else 0
        if code is not None:
            return (*_token_values(usage.__dict__), code)
    return usage


def _unpack(value: tuple[int, ...] | Usage) -> Usage:
    if isinstance(value, Usage):
        return value
    if len(value) == len(TOKEN_FIELDS):
        return trusted(Usage, dict(zip(TOKEN_FIELDS, value, strict=True)), _FIVE)
    *tokens, code = value
    return trusted(Usage, dict(zip(TOKEN_FIELDS, tokens, strict=True)), _FIELD_SETS[code])


def _record_from(row: tuple[Any, ...]) -> UsageRecord:
    principal, request_id, model, version, usage, cost, reason, raw, status, ms, ts = row
    return UsageRecord.of(
        principal=principal, request_id=request_id, model=model, model_version=version,
        usage=_unpack(usage), estimated_cost=cost, finish_reason=reason, raw_finish_reason=raw,
        status=status, duration_ms=None if ms is None else round(ms, 3), timestamp=ts,
    )


class Feedback(BaseModel):
    """A rating of one request: -1 (thumbs down) .. 5 (stars), comment, labels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    rating: int = Field(ge=-1, le=5)
    comment: str | None = Field(default=None, max_length=4000)
    labels: list[str] = Field(default_factory=list, max_length=20)
    created: float = Field(default_factory=time.time)


class RequestRecord(BaseModel):
    """One request's usage with its feedback, as ``GET /usage/requests/{id}`` shows it."""

    model_config = ConfigDict(frozen=True)

    record: UsageRecord
    feedback: Feedback | None = None


class UsageAggregate(BaseModel):
    """The caller's usage of one model on one UTC day."""

    model_config = ConfigDict(frozen=True)

    day: str
    model: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0
    estimated_cost: Decimal = Decimal(0)
    unpriced_requests: int = 0
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    feedback_count: int = 0
    rating_sum: int = 0


def counters_for(rec: UsageRecord) -> dict[str, int]:
    """The integer increments one record adds to its (principal, day, model) counters
    (zero increments left out)."""
    inc = {"requests": 1}
    usage = rec.usage
    for name in TOKEN_FIELDS:
        value = getattr(usage, name)
        if value:
            inc[name] = value
    if rec.estimated_cost is None:
        inc["unpriced"] = 1
    else:
        nanos = int((rec.estimated_cost * NANOS).to_integral_value())
        if nanos:
            inc["cost_nanos"] = nanos
    inc["fr:" + (rec.finish_reason or "unknown")] = 1
    return inc


def aggregate_from_counters(day: str, model: str, counters: Mapping[str, int]) -> UsageAggregate:
    fields: dict[str, Any] = {name: int(counters.get(name, 0)) for name in TOKEN_FIELDS}
    return UsageAggregate(
        day=day,
        model=model,
        requests=int(counters.get("requests", 0)),
        estimated_cost=Decimal(int(counters.get("cost_nanos", 0))) / NANOS,
        unpriced_requests=int(counters.get("unpriced", 0)),
        finish_reasons={k[3:]: int(v) for k, v in counters.items() if k.startswith("fr:")},
        feedback_count=int(counters.get("feedback_count", 0)),
        rating_sum=int(counters.get("rating_sum", 0)),
        **fields,
    )


def _day_range(start: date | None, end: date | None) -> tuple[str, str]:
    return (start.isoformat() if start else "0000-00-00", end.isoformat() if end else "9999-99-99")


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


# The counter names of one (principal, day, model) in MemoryLedger, by list position.
_SLOTS = ("requests", *TOKEN_FIELDS, "cost_nanos", "unpriced", "feedback_count", "rating_sum")
_REQUESTS, _COST, _UNPRICED, _FEEDBACK, _RATING = 0, 7, 8, 9, 10


class _Counters:
    """One aggregate's counters in memory: ints by position (a write adds to list slots
    instead of keyed dict entries) and finish reasons in first-seen order."""

    __slots__ = ("n", "reasons")

    def __init__(self) -> None:
        self.n = [0] * len(_SLOTS)
        self.reasons: dict[str, int] = {}

    def as_dict(self) -> dict[str, int]:
        """The flat counters every backend stores (``fr:<reason>`` keys included)."""
        out = dict(zip(_SLOTS, self.n, strict=True))
        for reason, count in self.reasons.items():
            out["fr:" + reason] = count
        return out


def _count(
    c: _Counters, usage: Usage | tuple[int, ...], cost: Decimal | None, cost_nanos: int | None,
    finish_reason: str | None,
) -> None:
    """Add one request to counters ``c`` in place (what :func:`counters_for` gives).
    ``usage``: a Usage or packed (``_pack``); ``cost_nanos``: ``cost`` in 1e-9 units if known."""
    if type(usage) is not tuple:
        usage = _tokens(usage)
    n = c.n
    n[0] += 1  # _SLOTS order
    n[1] += usage[0]
    n[2] += usage[1]
    n[3] += usage[2]
    if usage[3]:  # (cached, cache writes, reasoning: mostly none)
        n[4] += usage[3]
    if usage[4]:
        n[5] += usage[4]
    if usage[5]:
        n[6] += usage[5]
    if cost is None:
        n[_UNPRICED] += 1
    else:
        n[_COST] += int((cost * NANOS).to_integral_value()) if cost_nanos is None else cost_nanos
    reason = finish_reason or "unknown"
    reasons = c.reasons
    reasons[reason] = reasons.get(reason, 0) + 1


class MemoryLedger(Ledger):
    """In-process ledger, bounded: least recently used aggregates and requests go first.

    The usage layer writes through :meth:`record_values` (no await, no record built): a
    request is kept as its values and becomes a :class:`UsageRecord` when first read.
    """

    does_io = False

    def __init__(self, *, max_aggregates: int = 100_000, max_requests: int = 100_000) -> None:
        super().__init__()
        if max_aggregates < 1 or max_requests < 1:
            raise ValueError("max_aggregates and max_requests must be >= 1")
        self._max_aggregates = max_aggregates
        self._max_requests = max_requests
        self._aggs: OrderedDict[tuple[str, str, str], _Counters] = OrderedDict()
        # (principal, request_id) -> its values (not read yet), the record, or with feedback
        self._requests: OrderedDict[
            tuple[str, str], tuple[Any, ...] | UsageRecord | RequestRecord
        ] = OrderedDict()
        # the UTC day of the last write and its bounds [lo, hi): most writes share it
        self._day = ("", 0.0, 0.0)
        # the most recently used aggregate's key and counters: a write to the same key (the
        # usual run of requests) skips the lookup and the move to the end (it is there)
        self._last_key: tuple[str, str, str] | None = None
        self._last_counters = _Counters()

    def _counters(self, key: tuple[str, str, str]) -> _Counters:
        """The counters of ``key``, created if missing, marked most recently used."""
        if key == self._last_key:
            return self._last_counters
        aggs = self._aggs
        counters = aggs.get(key)
        if counters is None:
            counters = aggs[key] = _Counters()
            if len(aggs) > self._max_aggregates:
                aggs.popitem(last=False)
        else:
            aggs.move_to_end(key)
        self._last_key, self._last_counters = key, counters
        return counters

    def _put(self, key: tuple[str, str], value: UsageRecord | RequestRecord) -> None:
        reqs = self._requests
        size = len(reqs)
        reqs[key] = value
        if len(reqs) == size:  # replaced: now the most recent
            reqs.move_to_end(key)
        elif size >= self._max_requests:
            reqs.popitem(last=False)

    async def record(self, rec: UsageRecord) -> None:
        if self._pending:  # an earlier write failed: the base class keeps the order
            await super().record(rec)
            return
        try:
            self._write_now(rec)
        except Exception:
            self._failed(rec)
            self._keep(rec)

    def record_values(self, row: RecordValues, cost_nanos: int | None = None) -> bool:
        """:meth:`record` of ``UsageRecord.of(*row)``, without building it (sync, never raises).

        ``cost_nanos``: the cost in 1e-9 units when the caller has it (else derived).
        ``False`` (nothing done) when the record needs validation or an earlier write is
        pending: the caller then calls :meth:`record`.
        """
        if type(row[4]) is not Usage:
            return False
        return self._record_row((*row[:4], _pack(row[4]), *row[5:]), cost_nanos)

    def _record_row(self, row: tuple[Any, ...], cost_nanos: int | None = None) -> bool:
        """:meth:`record_values` of a row whose usage is packed already (``_pack``): the
        row is kept as it is (one tuple per request, no copy)."""
        principal, request_id, model, version, usage, cost, reason, raw, status, ms, ts = row
        # _plain, inline, the usage packed or kept as a Usage (per request)
        if self._pending or not (
            type(principal) is str
            and type(request_id) is str
            and (model is None or type(model) is str)
            and (version is None or type(version) is str)
            and (type(usage) is tuple or type(usage) is Usage)
            and (cost is None or type(cost) is Decimal)
            and (reason is None or type(reason) is str)
            and (raw is None or type(raw) is str)
            and (status is None or type(status) is int)
            and (ms is None or type(ms) is float)
            and type(ts) is float
        ):
            return False
        try:
            day, lo, hi = self._day
            if not lo <= ts < hi:
                index = int(ts // 86400)
                day, lo = _day(index), index * 86400.0
                self._day = (day, lo, lo + 86400.0)
            # what _add does, with the last key's counters at hand (a run of writes to one key)
            key = (principal, day, model or UNKNOWN_MODEL)
            c = self._last_counters if key == self._last_key else self._counters(key)
            _count(c, usage, cost, cost_nanos, reason)
            # what _put does, inline (per request)
            reqs = self._requests
            size = len(reqs)
            key2 = (principal, request_id)
            reqs[key2] = row
            if len(reqs) == size:  # replaced: now the most recent
                reqs.move_to_end(key2)
            elif size >= self._max_requests:
                reqs.popitem(last=False)
        except Exception:
            rec = _record_from(row)
            self._failed(rec)
            self._keep(rec)
        return True

    async def _write(self, rec: UsageRecord) -> None:
        self._write_now(rec)

    def _write_now(self, rec: UsageRecord) -> None:
        held = self._requests.get((rec.principal, rec.request_id))
        if isinstance(held, RequestRecord):
            held = held.record
        if isinstance(held, UsageRecord) and held.record_id == rec.record_id:
            return  # (written already: a job's row, by its worker and by a reaper)
        self._add(rec.principal, rec.day, rec.model, rec.usage, rec.estimated_cost, None,
                  rec.finish_reason)
        self._put((rec.principal, rec.request_id), rec)

    def _add(
        self, principal: str, day: str, model: str | None, usage: Usage | tuple[int, ...],
        cost: Decimal | None, cost_nanos: int | None, finish_reason: str | None,
    ) -> None:
        """Add one request to its counters: what :func:`counters_for` gives, added in place.
        ``usage``: a Usage or packed (``_pack``)."""
        _count(self._counters((principal, day, model or UNKNOWN_MODEL)), usage, cost,
               cost_nanos, finish_reason)

    async def query(
        self,
        principal: str,
        *,
        start: date | None = None,
        end: date | None = None,
        model: str | None = None,
    ) -> list[UsageAggregate]:
        lo, hi = _day_range(start, end)
        found = [
            aggregate_from_counters(day, mod, counters.as_dict())
            for (who, day, mod), counters in list(self._aggs.items())
            if who == principal and lo <= day <= hi and (model is None or mod == model)
        ]
        return sorted(found, key=lambda a: (a.day, a.model))

    async def get_request(self, principal: str, request_id: str) -> RequestRecord | None:
        key = (principal, request_id)
        found = self._requests.get(key)
        if found is None:
            return None
        if type(found) is tuple:  # first read: build the record once, keep it
            found = self._requests[key] = _record_from(found)
        self._requests.move_to_end(key)
        if isinstance(found, RequestRecord):
            return found
        assert isinstance(found, UsageRecord)
        return RequestRecord(record=found)

    async def add_feedback(self, principal: str, feedback: Feedback) -> bool:
        found = await self.get_request(principal, feedback.request_id)
        if found is None:
            return False
        rec = found.record
        n = self._counters((principal, rec.day, rec.model_key)).n
        if found.feedback is None:
            n[_FEEDBACK] += 1
        old = found.feedback.rating if found.feedback is not None else 0
        n[_RATING] += feedback.rating - old
        self._put((principal, feedback.request_id), RequestRecord(record=rec, feedback=feedback))
        return True
