"""The storage contract of the limiter and the sliding-window arithmetic both backends share.

Each (principal, limit) is a sliding-window counter: the count of the current fixed window
and of the previous one, weighted by how much of the previous window still overlaps the
sliding one (``prev * (window - elapsed) / window + curr``). State is three integers per
limit, whatever the number of principals or the tokens in the window, and it supports
exact refunds and extra charges, which reconciliation needs.

Both backends evaluate the same float expression in the same order (Lua numbers are IEEE
doubles, like Python floats) on integer inputs, so they take the same decisions for the same
events (``tests/test_ratelimit_backends.py`` drives both with hypothesis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

__all__ = [
    "Adjustment",
    "Backend",
    "Decision",
    "Hit",
    "WindowState",
    "fits",
    "remaining",
    "retry_after_ms",
    "roll",
]


class Hit(NamedTuple):
    """Charge ``cost`` on the counter ``field`` (window in ms) whose limit is ``limit``."""

    field: str
    window_ms: int
    limit: int
    cost: int


class Adjustment(NamedTuple):
    """Correct a reservation made in fixed window number ``window`` (``now // window_ms``):
    negative refunds, positive charges. ``held``: what the released lease held on this limit
    (a shared store): if its reservation was already refunded (the lease expired), it is
    charged back on top of ``delta``."""

    field: str
    window_ms: int
    window: int
    delta: int
    held: int = 0


class WindowState(NamedTuple):
    """A counter after an operation: fixed window number ``window`` (``now // window_ms``),
    ``prev``/``curr`` counts, and ``elapsed_ms`` into the current fixed window."""

    window: int
    prev: int
    curr: int
    elapsed_ms: int


class Decision(NamedTuple):
    """``failed``: index of the first refused hit, ``len(hits)`` for concurrency, or -1."""

    allowed: bool
    failed: int
    states: tuple[WindowState, ...]
    in_flight: int
    now_ms: int


class Backend(Protocol):
    """Where counters and leases live. Every method is one atomic step (one round trip).

    ``held`` (acquire): ``""``, or one ``"0"``/``"1"`` per hit; ``"1"``: the hit's cost is
    held under ``lease`` (given even without a concurrency limit), refunded from its window
    by a later step once the lease expires unrefreshed (its holder died), unless released
    first. A shared store needs it; in-process state dies with its holders, so the memory
    backend ignores it. ``refresh`` keeps a lease alive: ``concurrent`` for a concurrency
    lease, ``held`` for a held reservation (not revived once refunded)."""

    async def acquire(
        self,
        principal: str,
        hits: Sequence[Hit],
        *,
        lease: str | None = None,
        concurrency: int = 0,
        lease_ttl_ms: int = 0,
        held: str = "",
    ) -> Decision: ...

    async def adjust(
        self, principal: str, adjustments: Sequence[Adjustment], *, release: str | None = None
    ) -> None: ...

    async def refresh(
        self,
        principal: str,
        lease: str,
        ttl_ms: int,
        *,
        concurrent: bool = True,
        held: bool = False,
    ) -> None: ...

    async def mark_once(self, principal: str, tag: str, ttl_ms: int) -> bool: ...

    async def peek(self, principal: str, hits: Sequence[Hit]) -> tuple[WindowState, ...]: ...


def roll(index: int, prev: int, curr: int, now_index: int) -> tuple[int, int]:
    """(prev, curr) as seen from fixed window ``now_index``."""
    if index == now_index:
        return prev, curr
    if index == now_index - 1:
        return curr, 0
    return 0, 0


def fits(prev: int, curr: int, elapsed: int, window: int, limit: int, cost: int) -> bool:
    """The admission test; the Lua script evaluates exactly this expression."""
    used = float(prev) * float(window - elapsed) / float(window) + float(curr)
    return used + float(cost) <= float(limit)


def remaining(state: WindowState, window: int, limit: int) -> int:
    used = float(state.prev) * float(window - state.elapsed_ms) / float(window) + float(state.curr)
    return max(0, math.floor(float(limit) - used))


def retry_after_ms(state: WindowState, window: int, limit: int, cost: int) -> int:
    """How long until ``cost`` more would fit, assuming no other traffic (ms, >= 1)."""
    prev, curr, elapsed = state.prev, state.curr, state.elapsed_ms
    if cost > limit:
        return window  # never fits; callers refuse such requests before asking
    if curr + cost <= limit:
        # Wait for the previous window's weight to decay enough.
        if prev <= 0:
            return 1
        need = window * (1.0 - (limit - curr - cost) / prev)
        return max(1, math.ceil(need - elapsed) + 1)
    # Wait for the next window; then today's count becomes the decaying previous one.
    wait = window - elapsed
    if curr > 0:
        wait += max(0, math.ceil(window * (1.0 - (limit - cost) / curr)))
    return max(1, wait + 1)
