"""Wire formats of jobs, batches and webhook deliveries: frozen pydantic models, no I/O.

A :class:`Job` is what ``GET /jobs/{id}`` returns; a :class:`Batch` is what
``GET /batches/{id}`` returns. Both are stored as JSON by a ``JobStore`` and rebuilt
from it, so any worker can answer for them.
"""

from __future__ import annotations

import json
import secrets
import time
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aimiddleware.usage.models import Usage

__all__ = [
    "TERMINAL",
    "Batch",
    "BatchCounts",
    "BatchItem",
    "BatchItemResult",
    "Delivery",
    "DeliveryAttempt",
    "Job",
    "JobError",
    "JobStatus",
    "new_id",
]

JobStatus = Literal[
    "queued", "in_progress", "completed", "failed", "cancelling", "cancelled", "expired"
]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})


def new_id(prefix: str) -> str:
    """An unguessable id: ``prefix_`` + 144 random bits, URL-safe."""
    return f"{prefix}_{secrets.token_urlsafe(18)}"


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def is_id(rest: str) -> bool:
    """Whether ``rest`` (an id less its prefix) is URL-safe base64 of a sane length, as
    :func:`new_id` makes them: no ``:``, which would name another key in the store."""
    return 0 < len(rest) <= 64 and _ID_CHARS.issuperset(rest)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobError(_Frozen):
    """Why a job (or a batch item) did not complete: the taxonomy's stable code and a message."""

    code: str
    message: str
    type: str = "server_error"
    retryable: bool = False


class _Record(_Frozen):
    """What jobs and batches share: identity, owner, lifecycle, cost and timestamps."""

    object: str
    id: str
    principal: str = Field(exclude=True)
    status: JobStatus = "queued"
    usage: Usage | None = None
    cost: Decimal = Decimal(0)
    error: JobError | None = None
    callback_url: str | None = None
    fingerprint: str = Field(default="", exclude=True)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict[str, Any]:
        """The JSON body clients see."""
        return self.model_dump(mode="json")

    def stored(self) -> str:
        """The JSON a store keeps (with the fields hidden from clients)."""
        return _dumps(self._stored_data())

    def _stored_data(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["principal"] = self.principal
        data["fingerprint"] = self.fingerprint
        return data


class Job(_Record):
    """One asynchronous job, as stored and as shown to its owner (``principal`` excluded)."""

    object: Literal["job"] = "job"
    input: Any = None
    progress: float | None = None
    message: str | None = None
    partial_output: list[Any] = Field(default_factory=list)
    result: Any = None
    steps: int = 0


class BatchItem(_Frozen):
    custom_id: str = Field(min_length=1, max_length=256)
    input: Any = None


class BatchItemResult(_Frozen):
    """One JSON line of a batch's results, matched to its request by ``custom_id``."""

    custom_id: str
    type: Literal["succeeded", "errored", "cancelled", "expired"]
    output: Any = None
    error: JobError | None = None


class BatchCounts(_Frozen):
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    cancelled: int = 0
    expired: int = 0


class Batch(_Record):
    """A batch of items run by the job function with bounded concurrency.

    ``status`` follows the job statuses; a batch whose items errored still ``completed``:
    per-item outcomes are in the counts and in the JSON-lines results.
    """

    object: Literal["batch"] = "batch"
    items: list[BatchItem] = Field(default_factory=list, exclude=True)
    counts: BatchCounts = Field(default_factory=BatchCounts)
    total: int = 0

    def public(self) -> dict[str, Any]:
        data = super().public()
        # Relative to the batch's own URL (``.../batches/{id}``), wherever the router is mounted.
        data["results_url"] = f"{self.id}/results" if self.terminal else None
        return data

    def _stored_data(self) -> dict[str, Any]:
        data = super()._stored_data()
        data["items"] = [i.model_dump(mode="json") for i in self.items]
        return data


class DeliveryAttempt(_Frozen):
    at: float
    status: int | None = None
    error: str | None = None
    duration_ms: float = 0.0


class Delivery(_Frozen):
    """One webhook message in the outbox: its id is the ``webhook-id`` (stable across retries)."""

    id: str
    url: str
    payload: str
    attempts: list[DeliveryAttempt] = Field(default_factory=list)
    next_at: float = Field(default_factory=time.time)
    state: Literal["pending", "succeeded", "failed"] = "pending"
    created_at: float = Field(default_factory=time.time)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
