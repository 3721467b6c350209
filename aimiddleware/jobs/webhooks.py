"""Signed webhooks (Standard Webhooks 1.0) and the SSRF guard of their callback URLs.

Signing is pure: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64
HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one ``v1,`` entry per secret so a receiver
keeps verifying while secrets rotate. :class:`CallbackPolicy` says which callback URLs are
accepted, at submission and before every attempt. The outbox dispatcher that sends them is
:mod:`aimiddleware.jobs.dispatcher`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio

from aimiddleware.errors import InvalidRequest, UpstreamUnavailable

__all__ = ["CallbackPolicy", "WebhookSigner", "webhook_payload"]


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
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
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
        self.schemes = frozenset(s.lower() for s in _names("schemes", schemes))
        if not self.schemes <= {"http", "https"}:
            raise ValueError("callback schemes must be http and/or https")
        self.allow_hosts = (
            None if allow_hosts is None else [_host(h) for h in _names("allow_hosts", allow_hosts)]
        )
        self.deny_hosts = [_host(h) for h in _names("deny_hosts", deny_hosts)]
        self.allow_private = allow_private

    @staticmethod
    def _match(host: str, patterns: Iterable[str]) -> bool:
        return any(host == p or (p.startswith(".") and host.endswith(p)) for p in patterns)

    def check_syntax(self, url: str) -> str:
        """The host of an acceptable URL; raises ``InvalidRequest`` otherwise."""
        try:
            parts = urlsplit(url)
            host = _host(parts.hostname or "")
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


def _names(option: str, names: Iterable[str]) -> list[str]:
    """``names`` as a list of non-empty strs. A bare str is refused: taken for its letters,
    ``deny_hosts="bad.example.com"`` would deny no host at all."""
    if isinstance(names, str):
        raise TypeError(f"{option} must be a collection of names, e.g. [{names!r}]")
    found = list(names)
    if not all(isinstance(n, str) and n.strip(".") for n in found):
        raise ValueError(f"{option} must hold non-empty names, got {found!r}")
    return found


def _host(name: str) -> str:
    """A host name as the resolver and httpx read it: lowercase ASCII (IDNA: ``。`` and the
    other full stops separate labels, Unicode labels are punycode), no root ``.``; a name
    IDNA cannot encode stays as given (the lookup refuses it). A leading ``.`` (a pattern
    of subdomains) is kept."""
    if name.startswith("."):
        return "." + _host(name[1:])
    with contextlib.suppress(UnicodeError):
        name = name.encode("idna").decode("ascii")
    return name.lower().rstrip(".")


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
