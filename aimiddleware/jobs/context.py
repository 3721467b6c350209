"""What a job function gets: :class:`JobContext` (progress, partial output, usage, caps).

::

    async def summarize(ctx: JobContext, input: dict) -> dict:
        for chunk in input["chunks"]:
            await ctx.step()                              # counts towards max_steps
            text = await call_model(chunk)
            await ctx.partial(text)                       # streamed to GET /jobs/{id}/events
            await ctx.record_usage({"input_tokens": 900, "output_tokens": 120}, cost="0.0031")
            await ctx.progress(ctx.steps / len(input["chunks"]))
        return {"summary": "..."}

Exceeding ``max_steps`` or ``max_cost`` raises :class:`JobLimitExceeded` inside the
function; the job then ends ``failed`` with error code ``max_steps_exceeded`` or
``max_cost_exceeded`` (partial output and usage so far are kept). Cancellation arrives as
the usual anyio/asyncio cancellation at the function's next ``await``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from pydantic_core import to_jsonable_python

from aimiddleware.usage.models import Usage, believed

__all__ = ["Charge", "JobContext", "JobLimitExceeded", "add_usage"]

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
# (usage, cost or None, model or None): charges the job's owner (RateLimiter.charge);
# True when one of the owner's token or cost limits is spent
Charge = Callable[[Usage, Decimal | None, str | None], Awaitable[bool]]


class JobLimitExceeded(Exception):
    """A job hit ``max_steps`` or ``max_cost``; ends the job as failed with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_usage(a: Usage | None, b: Usage) -> Usage:
    if a is None:
        return b
    return Usage.model_validate(
        {name: getattr(a, name) + getattr(b, name) for name in Usage.model_fields}
    )


class JobContext:
    """Handed to the job function; every report is persisted and streamed to the client."""

    def __init__(
        self,
        job_id: str,
        input: Any,
        emit: Emit,
        *,
        max_steps: int | None = None,
        max_cost: Decimal | None = None,
        charge: Charge | None = None,
    ) -> None:
        self.id = job_id
        self._charge = charge
        self.input = input
        self._emit = emit
        self.max_steps = max_steps
        self.max_cost = max_cost
        self.steps = 0
        self.usage: Usage | None = None
        self.cost = Decimal(0)
        self.model: str | None = None  # (the last one ``record_usage`` named)

    async def progress(self, value: float | None = None, message: str | None = None) -> None:
        """Report progress (0..1) and/or a short human-readable status message."""
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError("progress must be between 0 and 1")
        if message is not None and not isinstance(message, str):  # (stored as JSON text)
            raise TypeError("progress message must be a str")
        await self._emit("progress", {"progress": value, "message": message})

    async def partial(self, output: Any) -> None:
        """Append a piece of partial output (any JSON value: ``ValueError`` otherwise)."""
        await self._emit("partial", {"output": to_jsonable_python(output)})

    async def record_usage(
        self,
        usage: Usage | Mapping[str, Any] | None = None,
        *,
        cost: Decimal | float | str | None = None,
        model: str | None = None,
    ) -> None:
        """Add what a model call used; raises :class:`JobLimitExceeded` past ``max_cost``.

        With ``JobsRouter(limiter=...)`` the call is also charged to the job's owner's token
        and cost limits (``cost`` as given, else ``usage`` priced for ``model``), and raises
        :class:`JobLimitExceeded` (``quota_exceeded``) once one of them is spent."""
        spent = None if cost is None else Decimal(str(cost))
        if spent is not None and (not spent.is_finite() or spent < 0):
            raise ValueError("cost must be a finite amount >= 0")  # (NaN: a record none reads)
        if model is not None:
            self.model = model
        u = None
        if usage is not None:
            u = believed(usage if isinstance(usage, Usage) else Usage.model_validate(dict(usage)))
            self.usage = add_usage(self.usage, u)
        if spent is not None:
            self.cost += spent
        spent_all = False
        if self._charge is not None and (u is not None or spent):
            spent_all = await self._charge(u or Usage(), spent, model)
        await self._emit("usage", {"usage": self.usage, "cost": self.cost, "steps": self.steps})
        if self.max_cost is not None and self.cost > self.max_cost:
            raise JobLimitExceeded(
                "max_cost_exceeded", f"The job's cost exceeded its cap of {self.max_cost}."
            )
        if spent_all:
            raise JobLimitExceeded(
                "quota_exceeded", "The caller's token or cost budget is spent; the job stopped."
            )

    async def step(self) -> int:
        """Count one agent step; raises :class:`JobLimitExceeded` past ``max_steps``."""
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            raise JobLimitExceeded(
                "max_steps_exceeded", f"The job exceeded its cap of {self.max_steps} steps."
            )
        await self._emit("usage", {"usage": self.usage, "cost": self.cost, "steps": self.steps})
        return self.steps
