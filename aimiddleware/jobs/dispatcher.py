"""The persistent outbox dispatcher of signed webhooks.

Deliveries go to the store's outbox first; a :class:`WebhookDispatcher` (in the jobs
lifespan, on any worker) claims due ones with a lease, at most ``host_concurrency`` in
flight per receiver host (so a receiver that hangs holds up only its own messages), POSTs
them signed, records every attempt and reschedules failures with backoff and jitter
(``Retry-After`` honoured, 410 or ``webhook-delivery: abort-message`` stop). A restart
resumes from the outbox.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio

from aimiddleware.errors import InvalidRequest, StoreUnavailable
from aimiddleware.headers import parse_http_date
from aimiddleware.jobs.models import Delivery, DeliveryAttempt, new_id
from aimiddleware.jobs.store import JobStore
from aimiddleware.jobs.webhooks import CallbackPolicy, WebhookSigner

__all__ = ["DEFAULT_SCHEDULE", "WebhookDispatcher"]

logger = logging.getLogger("aimiddleware.jobs")

# Standard Webhooks' example schedule (seconds after the previous attempt); jitter is added.
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)


def _receiver_host(url: str) -> str:
    """The receiver a delivery's attempts are capped per: ``host:port`` (the scheme's port
    when none is given), lowercased; the URL as given when it has no host (the policy
    refuses it at the attempt)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return url
    if not parts.hostname:
        return url
    host = parts.hostname.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The most of an answer's body read (and dropped): a receiver's body means nothing here,
# and read whole, one that answered an endless body held memory until the deadline.
_ANSWER_LIMIT = 64 * 1024


async def _drain(resp: Any) -> None:
    """Read up to ``_ANSWER_LIMIT`` bytes of the answer's body; the rest goes with the
    connection (closed, not pooled, when the stream closes unread)."""
    read = 0
    async for chunk in resp.aiter_raw():
        read += len(chunk)
        if read >= _ANSWER_LIMIT:
            return


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parse_http_date(value).timestamp() - now)
    except ValueError:
        return None


class WebhookDispatcher:
    """Delivers the outbox. Run :meth:`run` in a task group; many dispatchers may share a store.

    ``schedule``: delays between attempts (injectable so tests run in seconds); the message
    fails for good once it is exhausted. ``jitter``: +/- fraction added to each delay.
    ``concurrency``: deliveries in flight at once from this dispatcher. ``host_concurrency``:
    attempts in flight at once to one receiver host (``host:port``), counted across every
    dispatcher on the store: a host that is slow or never answers holds that many slots at
    most, while the other hosts' messages go out beside it (its other due messages wait in
    the outbox, no attempt made or counted, until an attempt of it ends). ``timeout``: the
    deadline of a whole attempt, answer included (a failed attempt once it passes). A
    claimed delivery is leased for ``timeout`` + 30 s, after which a dispatcher that
    crashed mid-attempt loses it to another (and its host the slot).
    """

    def __init__(
        self,
        store: JobStore,
        signer: WebhookSigner,
        *,
        policy: CallbackPolicy | None = None,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        jitter: float = 0.2,
        timeout: float = 15.0,
        poll_interval: float = 0.25,
        max_retry_after: float = 86400.0,
        concurrency: int = 16,
        host_concurrency: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if concurrency < 1 or host_concurrency < 1:
            raise ValueError("concurrency and host_concurrency must be >= 1")
        if not 0 < timeout < math.inf:
            raise ValueError("timeout must be a positive, finite number of seconds")
        self.concurrency = concurrency
        self.host_concurrency = host_concurrency
        self.store = store
        self.signer = signer
        self.policy = policy or CallbackPolicy()
        self.schedule = tuple(schedule)
        self.jitter = jitter
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_retry_after = max_retry_after
        self.clock = clock

    async def enqueue(self, url: str, payload: str) -> str:
        """Put a message in the outbox (due now); returns its ``webhook-id``."""
        delivery = Delivery(id=new_id("msg"), url=url, payload=payload, next_at=self.clock())
        await self.store.outbox_put(
            delivery.id, delivery.model_dump_json(), delivery.next_at, _receiver_host(url)
        )
        return delivery.id

    async def get(self, delivery_id: str) -> Delivery | None:
        raw = await self.store.outbox_get(delivery_id)
        return Delivery.model_validate_json(raw) if raw else None

    async def run(self, *, until_idle: bool = False) -> None:
        """Deliver the outbox until cancelled; ``until_idle``: return once nothing is due
        and nothing is in flight (a shutdown sending its own last messages)."""
        import httpx

        # Each attempt ends by its deadline (``timeout``, see _attempt), so a lease 30 s longer
        # (time to record the attempt) outlasts every live attempt: it runs out only for a
        # dispatcher that died mid-attempt, whose message another one then sends.
        lease = self.timeout + 30.0
        inflight = [0]

        async def deliver(client: Any, delivery: Delivery) -> None:
            try:
                await self._deliver(client, delivery)
            except Exception:  # (its store writes failed: leased, so it is due again later)
                logger.exception("webhook delivery %s failed", delivery.id)
            finally:
                inflight[0] -= 1

        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client,
            anyio.create_task_group() as tg,
        ):
            while True:
                free = self.concurrency - inflight[0]
                try:
                    # Shielded: messages the store leased are not lost to a stop (a cancel)
                    # while its answer is on the way, leased until their lease ran out; once
                    # claimed, a stop hands each back due now (see _deliver).
                    with anyio.CancelScope(shield=True):
                        claimed = await self.store.outbox_claim(
                            self.clock(), lease, free, self.host_concurrency
                        ) if free else []
                except StoreUnavailable:  # an outage: deliveries wait in the store
                    logger.warning("webhook dispatcher: the job store is unavailable")
                    await anyio.sleep(max(self.poll_interval, 1.0))
                    continue
                for raw in claimed:  # a slow receiver holds host_concurrency slots at most
                    inflight[0] += 1
                    tg.start_soon(deliver, client, Delivery.model_validate_json(raw))
                if not claimed:
                    if until_idle and not inflight[0]:
                        return
                    await anyio.sleep(self.poll_interval)

    async def _deliver(self, client: Any, delivery: Delivery) -> None:
        try:
            await self._attempt(client, delivery)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):  # shutting down: due again for whoever runs next
                await self.store.outbox_put(delivery.id, delivery.model_dump_json(),
                                            self.clock(), _receiver_host(delivery.url))
            raise

    async def _attempt(self, client: Any, delivery: Delivery) -> None:
        started = self.clock()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        stop = False
        body = delivery.payload.encode()
        try:
            # One deadline over the whole attempt (lookup, connect, send, every byte of the
            # answer): httpx's timeouts are per read, so a receiver that trickles its body a
            # byte at a time never trips them, would hold a slot for as long as it likes and
            # outlive the lease (the message then sent again beside the open attempt).
            with anyio.fail_after(self.timeout):
                await self.policy.check_resolved(delivery.url)
                async with client.stream(
                    "POST", delivery.url, content=body,
                    headers=self.signer.headers(delivery.id, body),
                ) as resp:
                    await _drain(resp)
            status = resp.status_code
            retry_after = _retry_after(resp.headers.get("retry-after"), self.clock())
            stop = status == 410 or resp.headers.get("webhook-delivery") == "abort-message"
        except InvalidRequest as exc:  # refused by the policy: final
            error, stop = exc.detail, True
        except Exception as exc:  # network errors, a lookup failure, the deadline: retry
            error = type(exc).__name__
        attempt = DeliveryAttempt(
            at=started, status=status, error=error, duration_ms=(self.clock() - started) * 1000
        )
        attempts = [*delivery.attempts, attempt]
        if status is not None and 200 <= status < 300:
            done = delivery.model_copy(update={"attempts": attempts, "state": "succeeded"})
            await self.store.outbox_done(delivery.id, done.model_dump_json())
            return
        retries = len(attempts) - 1
        if stop or retries >= len(self.schedule):
            done = delivery.model_copy(update={"attempts": attempts, "state": "failed"})
            await self.store.outbox_done(delivery.id, done.model_dump_json())
            return
        delay = self.schedule[retries] * (1 + random.uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        next_at = self.clock() + delay
        pending = delivery.model_copy(update={"attempts": attempts, "next_at": next_at})
        await self.store.outbox_put(
            delivery.id, pending.model_dump_json(), next_at, _receiver_host(delivery.url)
        )
