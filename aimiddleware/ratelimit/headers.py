"""Rate-limit response headers (pure): OpenAI's ``x-ratelimit-*`` and the IETF fields.

OpenAI set: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets as Go
durations (``6m0s``), each from the most constrained limit of that dimension. IETF
(draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy: "tokens-1m";q=100000;w=60`` and
``RateLimit: "tokens-1m";r=99000;t=42``, one member per limit, RFC 8941 Lists. Reset means
"time until the counter is back to its initial state" (a sliding window forgets the
previous window's count gradually); on a refusal the refused limit's reset is the time
until the request would fit, equal to ``Retry-After``. Cost budgets are not advertised in
headers (no registered unit; the 429 body names them).

:class:`HeaderPlan` holds everything that depends only on the limits (names, the constant
``RateLimit-Policy`` value, encoded once) and renders an admitted response's headers as raw
bytes; :func:`rate_limit_headers` is the general form (refusals).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import floor

from aimiddleware.ratelimit.backend import WindowState, remaining
from aimiddleware.ratelimit.policy import Limit

__all__ = ["HEADER_NAMES", "HeaderPlan", "go_ms", "rate_limit_headers", "reset_ms"]

HEADER_NAMES = frozenset(
    {
        f"x-ratelimit-{kind}-{dim}"
        for kind in ("limit", "remaining", "reset")
        for dim in ("requests", "tokens")
    }
    | {"ratelimit", "ratelimit-policy"}
)
_DIMS = ("requests", "tokens")
_CONCURRENCY_POLICY = '"concurrency";q={};qu="concurrent-requests"'


def go_ms(ms: int) -> str:
    """A Go-style duration (``12ms``, ``1s``, ``6m0s``, ``2.5s``) of a whole number of ms,
    computed on integers (what :func:`aimiddleware.headers.go_duration` computes, without its
    float rounding)."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    s, frac = divmod(rest, 1000)
    secs = f"{s}.{frac:03d}".rstrip("0") if frac else str(s)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


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
    for dim in _DIMS:
        mine = [r for r in rows if r[0].dimension == dim]
        if refused is not None and refused[0] < len(limits):
            failed = limits[refused[0]]
            mine = [r for r in mine if r[0] is failed] or mine
        if not mine:
            continue
        lim, left, reset = min(mine, key=lambda r: (r[1] / r[0].amount, r[0].window))
        out.append((f"x-ratelimit-limit-{dim}", str(lim.amount)))
        out.append((f"x-ratelimit-remaining-{dim}", str(left)))
        out.append((f"x-ratelimit-reset-{dim}", go_ms(reset)))
    policy = [lim.policy_item for lim, _, _ in rows]
    state_items = [
        f"{lim.policy_item.partition(';')[0]};r={left};t={-(-reset // 1000)}"
        for lim, left, reset in rows
    ]
    if concurrency:
        policy.append(_CONCURRENCY_POLICY.format(concurrency))
        left_c = max(0, concurrency - in_flight)
        t = 1 if refused is not None and refused[0] == len(limits) else 0
        state_items.append(f'"concurrency";r={left_c};t={t}')
    if policy:
        out.append(("ratelimit-policy", ", ".join(policy)))
        out.append(("ratelimit", ", ".join(state_items)))
    return out


class HeaderPlan:
    """The headers of an admitted request on one set of limits, precomputed.

    ``render(states, in_flight)`` equals ``rate_limit_headers(limits, states, concurrency,
    in_flight)`` encoded as latin-1 bytes, at a fraction of the cost.
    """

    __slots__ = ("_concurrency", "_dims", "_durations", "_policy", "_rows")

    def __init__(self, limits: Sequence[Limit], concurrency: int) -> None:
        # (index into states, window ms, amount, window s, '"name";r=', OpenAI slot or -1)
        rows: list[tuple[int, int, int, int, str, int]] = []
        policy: list[str] = []
        dims: list[tuple[bytes, bytes, bytes]] = []  # per slot: the three header names
        for dim in _DIMS:
            if any(lim.dimension == dim for lim in limits):
                dims.append((
                    f"x-ratelimit-limit-{dim}".encode(),
                    f"x-ratelimit-remaining-{dim}".encode(),
                    f"x-ratelimit-reset-{dim}".encode(),
                ))
        present = [d for d in _DIMS if any(lim.dimension == d for lim in limits)]
        for i, lim in enumerate(limits):
            if lim.dimension == "cost":
                continue
            slot = present.index(lim.dimension) if lim.dimension in present else -1
            prefix = lim.policy_item.partition(";")[0] + ";r="
            rows.append((i, lim.window * 1000, lim.amount, lim.window, prefix, slot))
            policy.append(lim.policy_item)
        if concurrency:
            policy.append(_CONCURRENCY_POLICY.format(concurrency))
        self._rows = tuple(rows)
        self._dims = tuple(dims)
        self._concurrency = concurrency
        self._policy = ", ".join(policy).encode("latin-1") if policy else None
        self._durations: dict[int, bytes] = {}  # reset ms -> Go duration (bounded cache)

    def render(self, states: Sequence[WindowState], in_flight: int) -> list[tuple[bytes, bytes]]:
        # Per OpenAI slot, the tightest limit: (remaining / amount, window s, left, reset, amount)
        best: list[tuple[float, int, int, int, int] | None] = [None] * len(self._dims)
        items: list[str] = []
        for i, window, amount, seconds, prefix, slot in self._rows:
            _, prev, curr, elapsed = states[i]
            # backend.remaining and reset_ms, inlined (same float expression).
            used = float(prev) * float(window - elapsed) / float(window) + float(curr)
            left = floor(float(amount) - used)
            if left < 0:
                left = 0
            reset = 2 * window - elapsed if curr > 0 else (window - elapsed if prev > 0 else 0)
            items.append(f"{prefix}{left};t={-(-reset // 1000)}")
            if slot >= 0:
                row = (left / amount, seconds, left, reset, amount)
                found = best[slot]
                if found is None or row[:2] < found[:2]:
                    best[slot] = row
        out: list[tuple[bytes, bytes]] = []
        durations = self._durations
        for (h_limit, h_remaining, h_reset), tight in zip(self._dims, best, strict=True):
            assert tight is not None
            _, _, left, reset, amount = tight
            duration = durations.get(reset)
            if duration is None:
                if len(durations) >= 512:
                    durations.clear()
                duration = durations[reset] = go_ms(reset).encode()
            out.append((h_limit, b"%d" % amount))
            out.append((h_remaining, b"%d" % left))
            out.append((h_reset, duration))
        if self._concurrency:
            items.append(f'"concurrency";r={max(0, self._concurrency - in_flight)};t=0')
        if self._policy is not None:
            out.append((b"ratelimit-policy", self._policy))
            out.append((b"ratelimit", ", ".join(items).encode("latin-1")))
        return out
