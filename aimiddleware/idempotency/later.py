"""Completed responses whose record the store did not take: written once it answers again.

A response is delivered even when its record cannot be written (the store is down at that
moment); :class:`LaterWrites` then completes the lease in the background, backing off, while
the claim is still ours (within ``lease_seconds``). Until then the key stays claimed: a retry
gets a ``503`` while the store is down, then a ``409``, never a second run.

On shutdown :meth:`LaterWrites.drain` tries what is left at once and waits for it, bounded.
A record still not written then is given up without releasing its key: the claim lapses
with its lease (a retry gets a ``409`` until then, then runs again), so nothing is ever run
twice because a write was abandoned.

asyncio only: under another event loop (trio) there is no background write and the claim
just lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aimiddleware.errors import StoreUnavailable
from aimiddleware.idempotency.models import Completed

if TYPE_CHECKING:
    from aimiddleware.idempotency.engine import IdempotencyEngine, Lease

__all__ = ["LaterWrites"]

logger = logging.getLogger("aimiddleware.idempotency")

_HURRIED = 0.05  # (s) between tries once a shutdown waits for them


class LaterWrites:
    """The engine's background record writes (one asyncio task each, kept until it ends)."""

    def __init__(self, engine: IdempotencyEngine) -> None:
        self.engine = engine
        self._tasks: set[asyncio.Task[bool]] = set()
        # Set by drain(): the writes stop backing off. One per event loop (an asyncio.Event
        # binds to the loop that first waits on it).
        self._hurry: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """Records still waiting for the store."""
        return len(self._tasks)

    def add(self, lease: Lease, record: Completed) -> None:
        """Complete ``lease`` with ``record`` in the background once the store answers again,
        while the claim is still ours (asyncio; elsewhere the claim just lapses)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (another event loop: trio)
            return
        if loop is not self._loop:
            self._loop, self._hurry = loop, asyncio.Event()
        task = loop.create_task(self._complete_when_back(lease, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _complete_when_back(self, lease: Lease, record: Completed) -> bool:
        engine = self.engine
        deadline = time.monotonic() + engine.config.lease_seconds
        delay = 0.1
        while time.monotonic() < deadline:
            await self._pause(delay)
            delay = min(delay * 2, 2.0)
            try:
                stored = await engine.store.complete(
                    lease.key, lease.owner, record, engine.config.retention_seconds
                )
            except StoreUnavailable:
                continue
            except Exception:
                logger.warning("could not store an idempotent response", exc_info=True)
                return False
            if stored:
                logger.info("idempotent response stored after the store came back")
            else:
                logger.warning("idempotency lease expired before the store came back; not stored")
            return bool(stored)
        return False

    async def _pause(self, delay: float) -> None:
        hurry = self._hurry
        if hurry is None:
            await asyncio.sleep(delay)
        elif hurry.is_set():
            await asyncio.sleep(min(delay, _HURRIED))
        else:
            with contextlib.suppress(asyncio.TimeoutError):  # (the delay passed unhurried)
                await asyncio.wait_for(hurry.wait(), delay)

    async def drain(self, timeout: float) -> int:  # noqa: ASYNC109 (a budget, not a cancel)
        """Try every waiting write now and wait up to ``timeout`` s for them; return how many
        were not stored. Those still running are cancelled: their keys are not released
        (each stays claimed until its lease lapses)."""
        tasks = set(self._tasks)
        if not tasks:
            return 0
        if self._hurry is not None:
            self._hurry.set()
        _, left = await asyncio.wait(tasks, timeout=max(timeout, 0.0))
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
        if self._hurry is not None:
            self._hurry.clear()  # (writes added later, say by an app started again, back off)
        return sum(1 for t in tasks if t.cancelled() or t.exception() is not None or not t.result())
