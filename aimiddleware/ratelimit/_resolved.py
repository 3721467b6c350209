"""The limits that apply to one (policy, route, model), resolved once.

``RateLimiter`` caches one :class:`_Resolved` per combination it has seen: the limits, the
concurrency, whether the body must be counted or priced, and what every request reuses
(the storage rows, the header plan, how long the counters live).
"""

from __future__ import annotations

from aimiddleware.ratelimit.headers import HeaderPlan
from aimiddleware.ratelimit.policy import Limit, Policy

_DIM_CODE = {"requests": 0, "tokens": 1, "input_tokens": 2, "output_tokens": 3, "cost": 4}


class _Resolved:
    """The limits of one (policy, route, model), with what each request reuses: the
    storage rows ``(field, window ms, amount, dimension code)``, the header plan, twice
    the longest window (how long the counters live), and which limits a lease holds."""

    __slots__ = (
        "caps", "codes", "concurrency", "held", "limits", "needs_body", "needs_cost", "plan",
        "rows", "span",
    )

    def __init__(
        self, limits: tuple[Limit, ...], concurrency: int, *, needs_body: bool, needs_cost: bool
    ) -> None:
        self.limits = limits
        self.concurrency = concurrency
        self.needs_body = needs_body
        self.needs_cost = needs_cost
        self.rows = tuple(
            (lim.field, lim.window * 1000, lim.amount, _DIM_CODE[lim.dimension]) for lim in limits
        )
        self.codes = tuple(_DIM_CODE[lim.dimension] for lim in limits)
        # What a shared store holds under a lease, refunded if the worker dies (Backend's
        # held): every limit but requests (a request that ran is a request); "" for none.
        self.held = "".join("1" if code else "0" for code in self.codes) if any(self.codes) else ""
        self.span = 2 * max([lim.window * 1000 for lim in limits], default=0)  # ms
        # (dimension code, smallest limit of that dimension): a cost above it never fits
        caps: dict[int, int] = {}
        for _, _, amount, code in self.rows:
            caps[code] = min(amount, caps.get(code, amount))
        self.caps = tuple(caps.items())
        self.plan = HeaderPlan(limits, concurrency)


def _all_limits(policy: Policy) -> list[Limit]:
    out = list(policy.limits)
    for sub in policy.models.values():
        out.extend(sub.limits)
    return out
