"""``Admission``: what one request reserved on its limits, handed back by ``RateLimiter.admit``.

It carries the principal, the limits and what each was charged (its hits), the estimate
they came from, the store's decision, the lease (concurrency, and on a shared store the
reservation it holds) and the rate-limit headers;
``RateLimiter.finish`` reads it back to replace the reservation by the real usage. The
limiter's fast path fills it without building a :class:`~aimiddleware.ratelimit.backend.Hit`
(its rows and their costs, ``_rows`` and ``_reserved``); :attr:`Admission.hits` builds them
when read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aimiddleware.ratelimit._resolved import _DIM_CODE
from aimiddleware.ratelimit.backend import Decision, Hit
from aimiddleware.ratelimit.estimate import Estimate
from aimiddleware.ratelimit.policy import Limit

__all__ = ["Admission"]


class Admission:
    """What one admitted (or refused) request reserved; ``decision`` None = admitted unchecked
    (fail-open while the store is down). ``raw_headers``: the rate-limit headers as bytes;
    ``headers``: the same as strings."""

    __slots__ = (
        "_codes", "_hits", "_reserved", "_rows", "concurrency", "decision", "done", "estimate",
        "held", "lease", "limits", "principal", "raw_headers", "stop_refresh",
    )

    def __init__(
        self,
        principal: str,
        limits: tuple[Limit, ...],
        hits: tuple[Hit, ...],
        estimate: Estimate,
        decision: Decision | None,
        lease: str | None,
        concurrency: int,
        raw_headers: list[tuple[bytes, bytes]],
        codes: tuple[int, ...] | None = None,
        held: str = "",
    ) -> None:
        self.principal = principal
        self.limits = limits
        self._hits: tuple[Hit, ...] | None = hits
        # Or each hit as (field, window ms, limit, i) with its cost _reserved[i]: the form
        # admit_now keeps (it builds no Hit); None: computed from the hits when needed.
        self._rows: Sequence[tuple[str, int, int, int]] | None = None
        self._reserved: Sequence[int] = ()
        self.estimate = estimate
        self.decision = decision
        self.lease = lease
        self.concurrency = concurrency
        # Which limits' reservations the lease holds in a shared store (the Backend's held):
        # refunded by the store if the lease expires, "" for none.
        self.held = held
        self.raw_headers = raw_headers
        # Settled (reconciled and released), or settling: it never is twice. Set once the
        # response has gone out whole, or when the call returns (whichever is first).
        self.done = False
        # Stops the task keeping the lease alive (awaited before the lease is released, so
        # a refresh in flight cannot add it back); None: no refresher running.
        self.stop_refresh: Callable[[], Awaitable[None]] | None = None
        # The dimension of each limit as an index into finish()'s usage tuple.
        self._codes = codes if codes is not None else tuple(_DIM_CODE[x.dimension] for x in limits)

    @property
    def hits(self) -> tuple[Hit, ...]:
        """What the request reserved on each limit."""
        if self._hits is None:
            reserved = self._reserved
            rows = self._rows or ()
            self._hits = tuple(Hit(f, w, lim, reserved[i]) for f, w, lim, i in rows)
        return self._hits

    def _as_rows(self) -> tuple[Sequence[tuple[str, int, int, int]], Sequence[int]]:
        """(rows, their costs): the stored ones, or the hits' own."""
        if self._rows is None:
            return _as_rows(self.hits)
        return self._rows, self._reserved

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]

    def __repr__(self) -> str:
        return (
            f"Admission(principal={self.principal!r}, hits={self.hits!r}, "
            f"lease={self.lease!r}, decision={self.decision!r})"
        )


def _as_rows(
    hits: Sequence[Hit],
) -> tuple[list[tuple[str, int, int, int]], list[int]]:
    """Hits as the memory store's rows (field, window ms, limit, i) and costs (by position)."""
    return [(hit[0], hit[1], hit[2], i) for i, hit in enumerate(hits)], [hit[3] for hit in hits]
