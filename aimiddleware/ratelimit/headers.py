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

import re
from collections.abc import Iterable, Sequence
from math import floor
from typing import Any

from aimiddleware.ratelimit.backend import WindowState, remaining
from aimiddleware.ratelimit.policy import Limit

__all__ = [
    "HEADER_NAMES", "HeaderPlan", "go_ms", "merge_rate_headers", "rate_limit_headers", "reset_ms",
]

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
# go_ms pieces as bytes: a duration under a second whole, and the ".523s" tail of the others
_SUB_SECOND = tuple((f"{ms}ms" if ms else "0s").encode() for ms in range(1000))
_TAILS = tuple(((f".{ms:03d}".rstrip("0") if ms else "") + "s").encode() for ms in range(1000))


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


RawHeaders = list[tuple[bytes, bytes]]
_RAW_NAMES = frozenset(name.encode() for name in HEADER_NAMES)
_TRIPLES = tuple(
    (b"x-ratelimit-limit-" + dim, b"x-ratelimit-remaining-" + dim, b"x-ratelimit-reset-" + dim)
    for dim in (b"requests", b"tokens")
)
# A member of an RFC 8941 List whose items are strings: '"name"' and its parameters (here
# tokens, integers and plain strings, no commas: those this module writes)
_MEMBER = re.compile(rb'[ \t]*("(?:[^"\\]|\\.)*")([^,"]*(?:"[^"]*"[^,"]*)*?)[ \t]*(?:,|\Z)')
_R = re.compile(rb";r=([0-9]+)")


def _members(value: bytes | None) -> dict[bytes, bytes] | None:
    """A ``RateLimit`` or ``RateLimit-Policy`` value as ``{name: member}``, in order (``{}``
    for none); None if it is not a list of named members."""
    out: dict[bytes, bytes] = {}
    if value is None:
        return out
    pos, end = 0, len(value)
    while pos < end:
        m = _MEMBER.match(value, pos)
        if m is None or m.end() == pos:
            return None
        out.setdefault(m[1], m[1] + m[2].rstrip())
        pos = m.end()
    return out


def _left(value: bytes | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _r(member: bytes) -> bytes | None:
    m = _R.search(member)
    return m[1] if m is not None else None


def _fewer(theirs: bytes | None, ours: bytes | None) -> bool:
    """Whether a remaining count ``theirs`` is below ``ours`` (an unreadable one never is)."""
    mine, other = _left(ours), _left(theirs)
    return other is not None and (mine is None or other < mine)


def merge_rate_headers(
    headers: Iterable[tuple[bytes, bytes]], ours: Sequence[tuple[bytes, bytes]]
) -> RawHeaders:
    """A response's ``headers`` with our rate-limit headers ``ours`` added.

    Where the response already carries rate-limit headers (a limiter inside ours: the
    ``@rate_limit`` decorator on an endpoint under the middleware), the client is told of
    whichever limit binds first, as one limiter tells of its own limits: per OpenAI
    dimension the three headers of the side with fewer remaining, and per IETF member name
    the member (and its policy) with fewer remaining; members of one side only are kept.
    A value this cannot read is replaced by ours."""
    kept: RawHeaders = []
    theirs: dict[bytes, bytes] = {}
    for name, value in headers:
        low = name.lower()
        if low in _RAW_NAMES:
            theirs[low] = value
        else:
            kept.append((name, value))
    if not theirs:
        return [*kept, *ours]
    mine = dict(ours)
    for names in _TRIPLES:
        pick = [mine.get(name) for name in names]
        other = [theirs.get(name) for name in names]
        if None not in other and (None in pick or _fewer(other[1], pick[1])):
            pick = other
        if None not in pick:
            kept += [(n, v) for n, v in zip(names, pick, strict=True) if v is not None]
    policy = _members(mine.get(b"ratelimit-policy")) or {}
    state = _members(mine.get(b"ratelimit")) or {}
    their_policy = _members(theirs.get(b"ratelimit-policy"))
    their_state = _members(theirs.get(b"ratelimit"))
    if their_policy is not None and their_state is not None:
        for name, member in their_state.items():
            if name not in state or _fewer(_r(member), _r(state[name])):
                state[name] = member
                if name in their_policy:
                    policy[name] = their_policy[name]
        for name, member in their_policy.items():
            policy.setdefault(name, member)
    if policy:
        kept.append((b"ratelimit-policy", b", ".join(policy.values())))
    if state:
        kept.append((b"ratelimit", b", ".join(state.values())))
    return kept


class HeaderPlan:
    """The headers of an admitted request on one set of limits, precomputed.

    ``render(states, in_flight)`` equals ``rate_limit_headers(limits, states, concurrency,
    in_flight)`` encoded as latin-1 bytes, at a fraction of the cost: the names and the
    constant headers (``RateLimit-Policy``, ``x-ratelimit-limit-*``) are built once, and the
    ``RateLimit`` value is one ``%`` on a precomputed bytes template.
    """

    __slots__ = (
        "_concurrency", "_direct", "_heads", "_policy", "_rows", "_slots", "_template", "fused",
    )

    def __init__(self, limits: Sequence[Limit], concurrency: int) -> None:
        # (index into states, window ms, window ms as float, amount as float, then the OpenAI
        #  headers it alone sets: (limit header, value), remaining name, reset name | 3 None)
        rows: list[tuple[Any, ...]] = []
        members: list[bytes] = []  # the RateLimit template: '"name";r=%d;t=%d' per row
        policy: list[str] = []
        for i, lim in enumerate(limits):
            if lim.dimension == "cost":
                continue
            window = lim.window * 1000
            rows.append((i, window, float(window), float(lim.amount), None, None, None))
            name = lim.policy_item.partition(";")[0].replace("%", "%%")
            members.append(name.encode("latin-1") + b";r=%d;t=%d")
            policy.append(lim.policy_item)
        # Per OpenAI dimension present: (the three header names, the candidate rows as
        # (position, amount, window s)); the tightest candidate sets them.
        slots: list[tuple[bytes, bytes, bytes, tuple[tuple[int, int, int], ...]]] = []
        for dim in _DIMS:
            cands = tuple(
                (j, limits[i].amount, limits[i].window)
                for j, (i, *_) in enumerate(rows)
                if limits[i].dimension == dim
            )
            if cands:
                slots.append((
                    f"x-ratelimit-limit-{dim}".encode(),
                    f"x-ratelimit-remaining-{dim}".encode(),
                    f"x-ratelimit-reset-{dim}".encode(),
                    cands,
                ))
        # The usual shape: one limit per OpenAI dimension, rows in the headers' order. Each
        # such row then writes its own headers while it is computed (no second pass).
        order = [cands[0][0] for *_, cands in slots]
        self._direct = all(len(c) == 1 for *_, c in slots) and order == sorted(order)
        if self._direct:
            for h_limit, h_remaining, h_reset, ((j, amount, _),) in slots:
                rows[j] = (*rows[j][:4], (h_limit, b"%d" % amount), h_remaining, h_reset)
        # What MemoryBackend.acquire_rendered renders per limit in its admission pass (no second
        # pass over the counters): None for a limit without headers (cost), else (amount as a
        # float, the OpenAI limit header or None, remaining name, reset name). None when the
        # plan is not direct (the tightest of several limits needs every row first).
        self.fused: tuple[tuple[Any, ...] | None, ...] | None = None
        if self._direct:
            by_limit: list[tuple[Any, ...] | None] = [None] * len(limits)
            for i, _, _, f_amount, h_limit, h_remaining, h_reset in rows:
                by_limit[i] = (f_amount, h_limit, h_remaining, h_reset)
            self.fused = tuple(by_limit)
        if concurrency:
            policy.append(_CONCURRENCY_POLICY.format(concurrency))
            members.append(b'"concurrency";r=%d;t=0')
        self._rows = tuple(rows)
        self._slots = tuple(slots)
        self._concurrency = concurrency
        self._template = b", ".join(members)
        self._policy = (
            (b"ratelimit-policy", ", ".join(policy).encode("latin-1")) if policy else None
        )
        # Whole seconds -> the Go duration up to its fraction (b"1m59"; bounded cache): a
        # reset changes every millisecond, its whole seconds once a second.
        self._heads: dict[int, bytes] = {}

    def _duration(self, reset: int) -> bytes:
        """``go_ms(reset)`` as bytes: the cached whole-second head and a precomputed tail."""
        if reset < 1000:
            return _SUB_SECOND[reset]
        seconds = reset // 1000
        head = self._heads.get(seconds)
        if head is None:
            if len(self._heads) >= 512:
                self._heads.clear()
            head = self._heads[seconds] = go_ms(seconds * 1000)[:-1].encode()
        return head + _TAILS[reset % 1000]

    def render(self, states: Sequence[WindowState], in_flight: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        args: list[int] = []  # the RateLimit template's values: r and t of each row
        resets: list[int] = []
        heads = self._heads
        direct = self._direct
        for i, window, f_window, f_amount, h_limit, h_remaining, h_reset in self._rows:
            _, prev, curr, elapsed = states[i]
            # backend.remaining and reset_ms, inlined: the same float expression (float op
            # int converts the int exactly as float() does).
            left = floor(f_amount - (prev * float(window - elapsed) / f_window + curr))
            if left < 0:
                left = 0
            reset = 2 * window - elapsed if curr > 0 else (window - elapsed if prev > 0 else 0)
            args += (left, -(-reset // 1000))  # (one list.extend rather than two appends)
            if h_limit is not None:
                head = heads.get(reset // 1000)  # self._duration(reset), inlined when cached
                duration = self._duration(reset) if head is None else head + _TAILS[reset % 1000]
                out += (h_limit, (h_remaining, b"%d" % left), (h_reset, duration))
            elif not direct:
                resets.append(reset)
        if not direct:
            for h_limit, h_remaining, h_reset, cands in self._slots:
                j, amount, seconds = cands[0]
                best = (args[2 * j] / amount, seconds)
                for cand in cands[1:]:  # the tightest: least remaining / amount, then window
                    key = (args[2 * cand[0]] / cand[1], cand[2])
                    if key < best:
                        best, j, amount = key, cand[0], cand[1]
                reset = resets[j]
                out.append((h_limit, b"%d" % amount))
                out.append((h_remaining, b"%d" % args[2 * j]))
                out.append((h_reset, self._duration(reset)))
        if self._policy is not None:
            if self._concurrency:
                left = self._concurrency - in_flight
                args.append(left if left > 0 else 0)
            out += (self._policy, (b"ratelimit", self._template % tuple(args)))
        return out
