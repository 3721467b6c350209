"""The typed refusals of the limiter (pure): which dimension and window, and when to retry.

Windows of a day or more and money budgets are ``QuotaExceeded`` (``x-should-retry:
false``: waiting seconds won't help); shorter windows are ``RateLimited`` with
``Retry-After`` (seconds, rounded up) and ``retry-after-ms`` no earlier than the time the
request would fit, uncapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from aimiddleware.errors import AIError, QuotaExceeded, RateLimited
from aimiddleware.ratelimit.backend import Decision, Hit, remaining, retry_after_ms
from aimiddleware.ratelimit.headers import rate_limit_headers
from aimiddleware.ratelimit.policy import Limit

__all__ = ["refused", "too_large"]

_DAY = 86_400


def _unit(lim: Limit) -> str:
    return "cost" if lim.dimension == "cost" else lim.dimension.replace("_", " ")


def _is_quota(lim: Limit) -> bool:
    return lim.dimension == "cost" or lim.window >= _DAY


def too_large(lim: Limit, requested: int) -> AIError:
    """A request bigger than a whole window can never be admitted: refuse it now."""
    amount = lim.display_amount
    need = _display(lim, requested)
    return QuotaExceeded(
        f"This request needs {need} {_unit(lim)}, more than the whole limit of {amount} "
        f"per {lim.window_name}; it can never be admitted. Reduce the input or max_tokens.",
        extra={
            "dimension": lim.dimension,
            "window": lim.window,
            "limit": amount,
            "requested": need,
            "violated-policies": [lim.name],
        },
    )


def _display(lim: Limit, units: int) -> str:
    if lim.dimension == "cost":
        return Limit("cost", units, lim.window).display_amount
    return str(units)


def refused(
    limits: Sequence[Limit], hits: Sequence[Hit], decision: Decision, concurrency: int
) -> AIError:
    failed = decision.failed
    if failed >= len(limits):
        headers = rate_limit_headers(
            limits, decision.states, concurrency, decision.in_flight, refused=(failed, 1000)
        )
        headers += [("retry-after", "1"), ("retry-after-ms", "1000")]
        return RateLimited(
            f"Too many concurrent requests: at most {concurrency} may be in flight.",
            headers=headers,
            extra={
                "dimension": "concurrency",
                "limit": concurrency,
                "violated-policies": ["concurrency"],
            },
        )
    lim, hit, state = limits[failed], hits[failed], decision.states[failed]
    wait_ms = retry_after_ms(state, hit.window_ms, hit.limit, hit.cost)
    headers = rate_limit_headers(
        limits, decision.states, concurrency, decision.in_flight, refused=(failed, wait_ms)
    )
    seconds = max(1, math.ceil(wait_ms / 1000))
    headers += [("retry-after", str(seconds)), ("retry-after-ms", str(wait_ms))]
    left = _display(lim, remaining(state, hit.window_ms, hit.limit))
    extra = {
        "dimension": lim.dimension,
        "window": lim.window,
        "limit": lim.display_amount,
        "requested": _display(lim, hit.cost),
        "remaining": left,
        "retry_after_ms": wait_ms,
        "violated-policies": [lim.name],
    }
    scope = lim.scope  # model:<name>, or route:<path>|model:<name> (a route's per-model limit)
    model = scope[6:] if scope.startswith("model:") else scope.partition("|model:")[2]
    where = f" for model {model}" if model else ""
    text = (
        f"{_unit(lim).capitalize()} limit of {lim.display_amount} per {lim.window_name}"
        f"{where} exceeded: this request needs {_display(lim, hit.cost)}, {left} remain."
    )
    if _is_quota(lim):
        return QuotaExceeded(
            f"{text} The budget frees up in {seconds}s.", headers=headers, extra=extra
        )
    return RateLimited(f"{text} Retry in {seconds}s.", headers=headers, extra=extra)
