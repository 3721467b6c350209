"""What ``install()``'s stack finishes on lifespan shutdown, before the app's own shutdown.

uvicorn sends ``lifespan.shutdown`` as soon as it has cancelled the requests still running
past ``--timeout-graceful-shutdown``, without waiting for them to unwind, and the app's
lifespan then closes the store. What would be lost:

- the cancelled requests' cleanups, which run shielded as they unwind (rate-limit refund,
  idempotency key release, the usage row), racing the store being closed;
- idempotent responses delivered while the store was down, whose records wait for it in the
  background (:class:`~aimiddleware.idempotency.later.LaterWrites`), cancelled with the
  event loop;
- usage rows in the ledger's retry buffer, kept only until the next write.

:class:`Drain` sees the shutdown message on its way to the app and, within ``grace`` seconds
in all: waits for requests still inside the stack to leave it, then tries the waiting
records and rows at once (each again until the deadline), and logs what it had to give up.
An idempotency record given up leaves its key claimed until the lease lapses: a retry gets
a ``409``, never a second run, until then.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from aimiddleware.types import Message, Receive

if TYPE_CHECKING:
    from aimiddleware.idempotency.engine import IdempotencyEngine
    from aimiddleware.usage.ledger import Ledger

__all__ = ["Drain"]

logger = logging.getLogger("aimiddleware.shutdown")

_POLL = 0.01  # (s) while requests unwind


class Drain:
    """``active``: requests inside the stack now (the stack counts them in and out)."""

    __slots__ = ("active", "engine", "grace", "ledger")

    def __init__(
        self, grace: float, engine: IdempotencyEngine | None, ledger: Ledger | None
    ) -> None:
        if grace < 0:
            raise ValueError("shutdown_grace must be >= 0")
        self.grace = grace
        self.engine = engine
        self.ledger = ledger
        self.active = 0

    def receive(self, receive: Receive) -> Receive:
        """The lifespan's ``receive``: a ``lifespan.shutdown`` reaches the app once drained."""

        async def drained_first() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                try:
                    await self.run()
                except Exception:  # (the app's own shutdown must still run)
                    logger.exception("shutdown: draining the stack failed")
            return message

        return drained_first

    async def run(self) -> None:
        deadline = anyio.current_time() + self.grace
        while self.active and anyio.current_time() < deadline:  # noqa: ASYNC110 - (no event
            # to wait on: requests count themselves with a bare integer, nothing per request)
            await anyio.sleep(_POLL)
        if self.active:
            logger.warning("shutdown: %d request(s) still unwinding after %.1f s; not waited "
                           "for", self.active, self.grace)
        lost = {"records": 0, "rows": 0}

        async def records(engine: IdempotencyEngine) -> None:
            lost["records"] = await engine.later.drain(deadline - anyio.current_time())

        async def rows(ledger: Ledger) -> None:
            with anyio.move_on_after(deadline - anyio.current_time()):
                while not await ledger.flush():  # noqa: ASYNC110 - (until the store answers)
                    await anyio.sleep(0.05)
            lost["rows"] = ledger.pending

        async with anyio.create_task_group() as tg:
            if self.engine is not None and len(self.engine.later):
                tg.start_soon(records, self.engine)
            if self.ledger is not None and self.ledger.pending:
                tg.start_soon(rows, self.ledger)
        if lost["records"]:
            logger.error(
                "shutdown: %d idempotent response(s) not stored (the store did not answer "
                "within %.1f s); their keys stay claimed until their lease lapses, then a "
                "retry runs again", lost["records"], self.grace,
            )
        if lost["rows"]:
            logger.error("shutdown: %d usage row(s) not written (the store did not answer "
                         "within %.1f s); they are lost", lost["rows"], self.grace)
