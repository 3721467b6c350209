"""Rate-limit response headers (pure): OpenAI's ``x-ratelimit-*`` and the IETF fields.

OpenAI set: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets as Go
durations (``6m0s``), each from the most constrained limit of that dimension. IETF
(draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy: "tokens-1m";q=100000;w=60`` and
``RateLimit: "tokens-1m";r=99000;t=42``, one member per limit, RFC 8941 Lists. Reset means
"time until the counter is back to its initial state" (a sliding window forgets the
previous window's count gradually); on a refusal the refused limit's reset is the time
until the request would fit, equal to ``Retry-After``. Cost budgets are not advertised in
headers (no registered unit; the 429 body names them).
"""

from __future__ import annotations

from collections.abc import Sequence

from aimiddleware.headers import go_duration
from aimiddleware.ratelimit.backend import WindowState, remaining
from aimiddleware.ratelimit.policy import Limit

__all__ = ["HEADER_NAMES", "rate_limit_headers", "reset_ms"]

HEADER_NAMES = frozenset(
    {
        f"x-ratelimit-{kind}-{dim}"
        for kind in ("limit", "remaining", "reset")
        for dim in ("requests", "tokens")
    }
    | {"ratelimit", "ratelimit-policy"}
)


def reset_ms(state: WindowState, window_ms: int) -> int:
    """Time until the counter forgets everything it holds."""
    if state.curr > 0:
        return 2 * window_ms - state.elapsed_ms
    if state.prev > 0:
        return window_ms - state.elapsed_ms
    return 0


def rate_limit_headers(
    limits: Sequence[Limit],
    states: Sequence[WindowState],
    concurrency: int = 0,
    in_flight: int = 0,
    *,
    refused: tuple[int, int] | None = None,
) -> list[tuple[str, str]]:
    """All rate-limit headers for one response. ``refused``: (limit index, retry ms)."""
    rows: list[tuple[Limit, int, int]] = []  # (limit, remaining, reset ms)
    for i, (lim, state) in enumerate(zip(limits, states, strict=False)):
        if lim.dimension == "cost":
            continue
        window_ms = lim.window * 1000
        left = remaining(state, window_ms, lim.amount)
        reset = reset_ms(state, window_ms)
        if refused is not None and refused[0] == i:
            reset = refused[1]
        rows.append((lim, left, reset))
    out: list[tuple[str, str]] = []
    for dim in ("requests", "tokens"):
        mine = [r for r in rows if r[0].dimension == dim]
        if refused is not None and refused[0] < len(limits):
            failed = limits[refused[0]]
            mine = [r for r in mine if r[0] is failed] or mine
        if not mine:
            continue
        lim, left, reset = min(mine, key=lambda r: (r[1] / r[0].amount, r[0].window))
        out.append((f"x-ratelimit-limit-{dim}", str(lim.amount)))
        out.append((f"x-ratelimit-remaining-{dim}", str(left)))
        out.append((f"x-ratelimit-reset-{dim}", go_duration(reset / 1000)))
    policy = [lim.policy_item for lim, _, _ in rows]
    state_items = [
        f"{lim.policy_item.partition(';')[0]};r={left};t={-(-reset // 1000)}"
        for lim, left, reset in rows
    ]
    if concurrency:
        policy.append(f'"concurrency";q={concurrency};qu="concurrent-requests"')
        left_c = max(0, concurrency - in_flight)
        t = 1 if refused is not None and refused[0] == len(limits) else 0
        state_items.append(f'"concurrency";r={left_c};t={t}')
    if policy:
        out.append(("ratelimit-policy", ", ".join(policy)))
        out.append(("ratelimit", ", ".join(state_items)))
    return out
