"""Signed webhooks (Standard Webhooks 1.0), an SSRF guard, and a persistent outbox dispatcher.

Signing is pure: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64
HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one ``v1,`` entry per secret so a receiver
keeps verifying while secrets rotate. Deliveries go to the store's outbox first; a
:class:`WebhookDispatcher` (in the jobs lifespan, on any worker) claims due ones with a
lease, at most ``host_concurrency`` in flight per receiver host (so a receiver that hangs
holds up only its own messages), POSTs them, records every attempt and reschedules
failures with backoff and jitter (``Retry-After`` honoured, 410 or ``webhook-delivery:
abort-message`` stop). A restart resumes from the outbox.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import anyio

from aimiddleware.errors import InvalidRequest, StoreUnavailable, UpstreamUnavailable
from aimiddleware.headers import parse_http_date
from aimiddleware.jobs.models import Delivery, DeliveryAttempt, new_id
from aimiddleware.jobs.store import JobStore

__all__ = [
    "DEFAULT_SCHEDULE",
    "CallbackPolicy",
    "WebhookDispatcher",
    "WebhookSigner",
    "webhook_payload",
]

logger = logging.getLogger("aimiddleware.jobs")

# Standard Webhooks' example schedule (seconds after the previous attempt); jitter is added.
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)


class WebhookSigner:
    """Signs with one or more ``whsec_`` secrets (the first is current; the rest rotate out)."""

    def __init__(self, secrets: str | Iterable[str]) -> None:
        values = [secrets] if isinstance(secrets, str) else list(secrets)
        if not values:
            raise ValueError("at least one webhook secret is needed")
        self._keys: list[bytes] = []
        for value in values:
            raw = value.removeprefix("whsec_")
            try:
                key = base64.b64decode(raw, validate=True)
            except ValueError as exc:
                raise ValueError("a webhook secret must be whsec_ + base64") from exc
            if not 24 <= len(key) <= 64:
                raise ValueError("a webhook secret must decode to 24..64 bytes")
            self._keys.append(key)

    @staticmethod
    def generate_secret() -> str:
        import secrets as _secrets

        return "whsec_" + base64.b64encode(_secrets.token_bytes(32)).decode()

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        if "." in msg_id:
            raise ValueError("a webhook id must not contain '.'")
        signed = f"{msg_id}.{timestamp}.".encode() + body
        sigs = (
            base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
            for k in self._keys
        )
        return " ".join(f"v1,{s}" for s in sigs)

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = int(time.time()) if timestamp is None else timestamp
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": self.signature(msg_id, ts, body),
            "content-type": "application/json",
        }


def webhook_payload(event_type: str, data: dict[str, Any]) -> str:
    """A self-contained payload ``{type, timestamp, data}``: the receiver needs no further call."""
    ts = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": ts, "data": data}, separators=(",", ":"))


class CallbackPolicy:
    """Which callback URLs are accepted (server-side request forgery guard).

    ``schemes``: allowed URL schemes (https only by default). ``allow_hosts``: when given,
    only these hosts (exact, or ``.example.com`` for subdomains); a host listed here may
    also resolve to a private address. ``deny_hosts``: always refused. Addresses that are
    private, loopback, link-local, multicast, reserved or unspecified are refused unless
    ``allow_private`` is true or the host is in ``allow_hosts``. Names are resolved at
    submit time and again before every attempt.
    """

    def __init__(
        self,
        *,
        schemes: Iterable[str] = ("https",),
        allow_hosts: Iterable[str] | None = None,
        deny_hosts: Iterable[str] = (),
        allow_private: bool = False,
    ) -> None:
        self.schemes = frozenset(s.lower() for s in schemes)
        if not self.schemes <= {"http", "https"}:
            raise ValueError("callback schemes must be http and/or https")
        self.allow_hosts = None if allow_hosts is None else [h.lower() for h in allow_hosts]
        self.deny_hosts = [h.lower() for h in deny_hosts]
        self.allow_private = allow_private

    @staticmethod
    def _match(host: str, patterns: Iterable[str]) -> bool:
        return any(host == p or (p.startswith(".") and host.endswith(p)) for p in patterns)

    def check_syntax(self, url: str) -> str:
        """The host of an acceptable URL; raises ``InvalidRequest`` otherwise."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 (raises for a port that is not a number in 0-65535)
        except ValueError as exc:  # a malformed IPv6 literal, a bad port
            raise InvalidRequest("callback_url is not a valid URL.", param="callback_url") from exc
        if parts.scheme.lower() not in self.schemes or not host:
            raise InvalidRequest("callback_url must be an absolute URL with an allowed scheme.",
                                 param="callback_url")
        if parts.username or parts.password:
            raise InvalidRequest("callback_url must not carry credentials.", param="callback_url")
        if self._match(host, self.deny_hosts) or (
            self.allow_hosts is not None and not self._match(host, self.allow_hosts)
        ):
            raise InvalidRequest("callback_url host is not allowed.", param="callback_url")
        return host

    async def check(self, url: str) -> None:
        """Raises ``InvalidRequest`` for a URL this policy refuses or whose host does not
        resolve (at submit time the client hears of a mistyped name at once), and a retryable
        ``UpstreamUnavailable`` (503) when the resolver could not answer for now."""
        try:
            await self.check_resolved(url)
        except OSError as exc:
            if isinstance(exc, socket.gaierror) and exc.errno in _RESOLVER_TRANSIENT:
                raise UpstreamUnavailable(
                    "The callback_url host could not be resolved right now; retry.",
                    param="callback_url", retry_after=1,
                ) from exc
            raise InvalidRequest(
                "callback_url host does not resolve.", param="callback_url"
            ) from exc

    async def check_resolved(self, url: str) -> None:
        """As :meth:`check`, but a failed lookup raises its ``OSError`` unchanged: before a
        delivery attempt a name that does not resolve now may resolve later (a resolver
        timeout, SERVFAIL), so the dispatcher retries it like a network error. A refusal,
        such as a name that resolves to a private address, is still ``InvalidRequest``."""
        host = self.check_syntax(url)
        if self.allow_private or (self.allow_hosts and self._match(host, self.allow_hosts)):
            return
        port = urlsplit(url).port or 443
        infos = await anyio.getaddrinfo(host, port)
        for info in infos:
            addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not _public(addr):
                raise InvalidRequest(
                    "callback_url resolves to a private or reserved address.", param="callback_url"
                )


# getaddrinfo's "try again" answers (a resolver timeout, SERVFAIL), as opposed to a name that
# does not exist (EAI_NONAME), which is the caller's mistake.
_RESOLVER_TRANSIENT = frozenset(
    code for code in (getattr(socket, "EAI_AGAIN", None), getattr(socket, "EAI_FAIL", None))
    if code is not None
)

# IPv6 prefixes whose last 32 bits are an IPv4 address that the address reaches: NAT64
# (RFC 6052), IPv4-compatible (deprecated), IPv4-translated (SIIT, RFC 6145).
_EMBEDDING = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
# Listed because older Pythons' is_global tables do not know them: local-use NAT64 (RFC 8215).
_NOT_GLOBAL = (ipaddress.ip_network("64:ff9b:1::/48"),)


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, and so is any IPv4 address it embeds (mapped, NAT64,
    IPv4-compatible, IPv4-translated or 6to4: each can reach that IPv4 host)."""
    if not addr.is_global or addr.is_multicast:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if any(addr in net for net in _NOT_GLOBAL):
            return False
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and any(addr in net for net in _EMBEDDING):
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return _public(embedded)
    return True


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
                resp = await client.post(
                    delivery.url, content=body, headers=self.signer.headers(delivery.id, body)
                )
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
