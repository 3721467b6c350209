"""The usage ledger's records: what one request adds and what a query returns (pure).

:class:`UsageRecord` is one finished request as the usage layer records it; every ledger
backend turns it into flat integer counters per (principal, UTC day, model)
(:func:`counters_for`) and a query turns those back into a :class:`UsageAggregate`
(:func:`aggregate_from_counters`). :class:`Feedback` rates one request, and
:class:`RequestRecord` is one request with its feedback. Frozen pydantic models and pure
functions, no I/O; the ledgers themselves are in :mod:`aimiddleware.usage.ledger`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aimiddleware._trusted import trusted
from aimiddleware.usage.models import Usage

__all__ = [
    "Feedback",
    "RequestRecord",
    "UsageAggregate",
    "UsageRecord",
    "aggregate_from_counters",
    "counters_for",
    "new_record_id",
    "utc_day",
]

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

    model_config = ConfigDict(frozen=True, protected_namespaces=())

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
