"""``MemoryLedger``: the in-process usage ledger (the embedded default), bounded.

Aggregates and requests are kept in LRU order, the least recently used going first. A
request is kept as the tuple of its values (its usage packed into plain ints, which the
garbage collector does not track) and becomes a :class:`UsageRecord` when first read; the
usage layer writes through :meth:`MemoryLedger.record_values` (no await, no record built).
"""

from __future__ import annotations

import gc
import operator
from collections import OrderedDict
from datetime import date
from decimal import Decimal
from typing import Any

from aimiddleware._trusted import field_masks, trusted
from aimiddleware.usage.ledger import Ledger
from aimiddleware.usage.models import _FIVE, _FIVE_SET, Usage
from aimiddleware.usage.records import (
    NANOS,
    TOKEN_FIELDS,
    UNKNOWN_MODEL,
    Feedback,
    RequestRecord,
    UsageAggregate,
    UsageRecord,
    _day,
    _day_range,
    aggregate_from_counters,
)

__all__ = ["MemoryLedger"]

#: One finished request as :meth:`MemoryLedger.record_values` takes it: the arguments of
#: :meth:`UsageRecord.of` in their order, ``duration_ms`` not yet rounded (to 3 places).
RecordValues = tuple[
    str, str, str | None, str | None, Usage, Decimal | None, str | None, str | None,
    int | None, float | None, float,
]


# A stored row holds its Usage as plain ints: a tuple of atomic values is untracked by the
# garbage collector, so 100k kept requests do not make every full collection walk them.
# A row's code is its fields set as a bit mask over TOKEN_FIELDS: every subset has one (a
# stream's usage, three fields set, kept a whole Usage: three tracked objects per row).
_FIELD_SETS, _CODES = field_masks(TOKEN_FIELDS)
_token_values = operator.itemgetter(*TOKEN_FIELDS)  # of a Usage's __dict__, in C
_tokens = operator.attrgetter(*TOKEN_FIELDS)  # of any Usage


def _pack(usage: Usage) -> tuple[int, ...] | Usage:
    """``usage`` as a row keeps it: its TOKEN_FIELDS values, then the code of its fields set
    unless that is the shared ``_FIVE_SET`` (the usual Usage: six values only, one C call);
    a Usage with a field set beyond TOKEN_FIELDS, or not a Usage as such, is kept as it is."""
    if type(usage) is Usage:
        fields = usage.__pydantic_fields_set__
        if fields is _FIVE_SET:
            return _token_values(usage.__dict__)  # type: ignore[no-any-return]
        code = _CODES.get(frozenset(fields))
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


# CPython 3.13 made Decimal a type the garbage collector tracks: a row holding its cost as a
# Decimal would be tracked too (two objects per kept request). There the row keeps the cost
# as its text (exact: Decimal(str(d)) == d, same digits), turned back when the row is read.
_DECIMAL_UNTRACKED = not gc.is_tracked(Decimal(1))


def _record_from(row: tuple[Any, ...]) -> UsageRecord:
    principal, request_id, model, version, usage, cost, reason, raw, status, ms, ts = row
    if type(cost) is str:
        cost = Decimal(cost)
    return UsageRecord.of(
        principal=principal, request_id=request_id, model=model, model_version=version,
        usage=_unpack(usage), estimated_cost=cost, finish_reason=reason, raw_finish_reason=raw,
        status=status, duration_ms=None if ms is None else round(ms, 3), timestamp=ts,
    )


# The counter names of one (principal, day, model) in MemoryLedger, by key in its counters.
_SLOTS = ("requests", *TOKEN_FIELDS, "cost_nanos", "unpriced", "feedback_count", "rating_sum")
_REQUESTS, _COST, _UNPRICED, _FEEDBACK, _RATING = 0, 7, 8, 9, 10

Counters = dict[int | str, int]
"""One aggregate's counters in memory: ints keyed by their position in ``_SLOTS`` (a write
adds to dict entries as it would to list slots), then the finish reasons' counts keyed by
name, in first-seen order. A dict of ints with int and str keys is untracked by the
garbage collector, so 100,000 aggregates add nothing to a full collection (a list and its
holder were two tracked objects per aggregate)."""

_ZERO: Counters = dict.fromkeys(range(len(_SLOTS)), 0)


def _new_counters() -> Counters:
    return _ZERO.copy()  # (a copy of an untracked dict is untracked)


def _as_dict(c: Counters) -> dict[str, int]:
    """The flat counters every backend stores (``fr:<reason>`` keys included)."""
    out = {name: c[i] for i, name in enumerate(_SLOTS)}
    for reason, count in c.items():
        if type(reason) is str:
            out["fr:" + reason] = count
    return out


def _count(
    n: Counters, usage: Usage | tuple[int, ...], cost: Decimal | None, cost_nanos: int | None,
    finish_reason: str | None,
) -> None:
    """Add one request to counters ``n`` in place (what :func:`counters_for` gives).
    ``usage``: a Usage or packed (``_pack``); ``cost_nanos``: ``cost`` in 1e-9 units if known."""
    if type(usage) is not tuple:
        usage = _tokens(usage)
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
    n[reason] = n.get(reason, 0) + 1


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
        self._aggs: OrderedDict[tuple[str, str, str], Counters] = OrderedDict()
        # principal -> its keys of _aggs: a query reads one tenant's aggregates, not every
        # tenant's (a scan of 100,000 held the event loop ~0.1 s per GET /usage). A tuple of
        # tuples of text, which the garbage collector stops tracking (a dict would not).
        self._mine: dict[str, tuple[tuple[str, str, str], ...]] = {}
        # (principal, request_id) -> its values (not read yet), the record, or with feedback
        self._requests: OrderedDict[
            tuple[str, str], tuple[Any, ...] | UsageRecord | RequestRecord
        ] = OrderedDict()
        # the UTC day of the last write and its bounds [lo, hi): most writes share it
        self._day = ("", 0.0, 0.0)
        # the most recently used aggregate's key and counters: a write to the same key (the
        # usual run of requests) skips the lookup and the move to the end (it is there)
        self._last_key: tuple[str, str, str] | None = None
        self._last_counters = _new_counters()

    def _counters(self, key: tuple[str, str, str]) -> Counters:
        """The counters of ``key``, created if missing, marked most recently used."""
        if key == self._last_key:
            return self._last_counters
        aggs = self._aggs
        counters = aggs.get(key)
        if counters is None:
            counters = aggs[key] = _new_counters()
            mine = self._mine
            mine[key[0]] = (*mine.get(key[0], ()), key)  # (a new day or model: seldom)
            if len(aggs) > self._max_aggregates:
                old = aggs.popitem(last=False)[0]
                left = tuple(k for k in mine[old[0]] if k != old)
                if left:
                    mine[old[0]] = left
                else:
                    del mine[old[0]]
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
            reqs[key2] = row if _DECIMAL_UNTRACKED or cost is None else (
                *row[:5], str(cost), *row[6:])
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
        aggs = self._aggs
        found = [
            aggregate_from_counters(key[1], key[2], _as_dict(aggs[key]))
            for key in self._mine.get(principal, ())
            if lo <= key[1] <= hi and (model is None or key[2] == model)
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
        n = self._counters((principal, rec.day, rec.model_key))
        if found.feedback is None:
            n[_FEEDBACK] += 1
        old = found.feedback.rating if found.feedback is not None else 0
        n[_RATING] += feedback.rating - old
        self._put((principal, feedback.request_id), RequestRecord(record=rec, feedback=feedback))
        return True
