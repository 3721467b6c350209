"""Timing-sensitive tests on a loaded machine: tell a regression from a stalled event loop.

Some tests must see something happen *in time*: a TTL not yet expired, a heartbeat per
interval, a cancellation within a bound. A machine that stops running the test for a while
(GC, a loaded two-core CI box, a slow Redis) breaks that premise without any bug. Widening
every margin to a second or more would slow the suite down; instead such a test runs its
scenario under :func:`steady`, which reruns an attempt whose premise was broken by a stall:

* :func:`in_time` turns a "not yet expired" check that came too late (measured) into
  :class:`Stalled`;
* an assertion (or ``TimeoutError``) raised while this event loop was seen waking up later
  than ``stall`` seconds is taken as a stall too.

Every assertion stays as strict as before: an attempt only passes by meeting it, and an
attempt that fails on an undisturbed machine fails the test at once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

T = TypeVar("T")


class Stalled(Exception):
    """The machine stalled during a timing-sensitive step: that attempt proves nothing."""


def in_time(ok: bool, since: float, within: float) -> bool:
    """``ok``; or, when it is false and more than ``within`` seconds passed since ``since``
    (``time.monotonic()``), raise :class:`Stalled`: the check that had to be made within
    ``within`` seconds (e.g. before a TTL ran out) came too late to prove anything."""
    if not ok and time.monotonic() - since >= within:
        raise Stalled(f"a check due within {within} s came {time.monotonic() - since:.3f} s late")
    return ok


class LoopLag:
    """How late this event loop ran a task that sleeps ``tick`` seconds at a time."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.worst = 0.0
        self.due = time.perf_counter() + tick

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.due = time.perf_counter() + self.tick
        task_status.started()
        while True:
            await anyio.sleep(self.tick)
            now = time.perf_counter()
            self.worst = max(self.worst, now - self.due)
            self.due = now + self.tick

    def seen(self) -> float:
        """The longest stall so far, counting a wake-up overdue right now."""
        return max(self.worst, time.perf_counter() - self.due)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def steady(
    scenario: Callable[[], Awaitable[T]], *, stall: float = 0.1, attempts: int = 3
) -> T:
    """Run ``scenario`` (a fresh attempt each time: new keys, new ids) until an attempt
    passes, or fails undisturbed (no :class:`Stalled`, and this event loop never woke up
    ``stall`` seconds late or more meanwhile); at most ``attempts`` times, the last
    attempt's failure being raised whatever its cause."""
    for attempt in range(1, attempts + 1):
        lag = LoopLag()
        result: list[T] = []
        error: Exception | None = None
        worst = 0.0
        async with anyio.create_task_group() as tg:
            await tg.start(lag.run)
            try:
                result.append(await scenario())
            except Exception as exc:  # judged below, outside the task group
                error = exc
                worst = lag.seen()
            finally:
                tg.cancel_scope.cancel()
        if error is None:
            return result[0]
        leaves = _leaves(error)  # (a task group in the scenario wraps what it raises)
        stalled = any(isinstance(e, Stalled) for e in leaves) or (
            worst >= stall and all(isinstance(e, (AssertionError, TimeoutError)) for e in leaves)
        )
        if not stalled or attempt == attempts:
            raise error
        print(f"\nattempt {attempt} disturbed (event loop up to {worst:.3f} s late): {error!r}")
    raise AssertionError("unreachable")
