"""Request fingerprints: HMAC-SHA256 over the length-prefixed request parts (pure).

The same key with a different fingerprint is a 422 ``idempotency_key_reused``. Each part is
prefixed by its length, so ``/orders/12`` + ``3`` and ``/orders/1`` + ``23`` differ, and the
digest is keyed by a secret, so a 422 or a replay cannot be used to test guesses of another
request's body.

The secret defaults to a random one per :class:`Fingerprinter` (per store instance). That is
right for one process; **a deployment with several workers or hosts must configure one
shared secret** (``IdempotencyConfig(secret=...)``), or a retry landing on another worker
will not match its own first attempt and get a 422.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl

__all__ = ["Fingerprinter", "canonical_query"]


def _lp(part: bytes) -> bytes:
    return len(part).to_bytes(8, "big") + part


def canonical_query(query_string: bytes) -> bytes:
    """The query as length-prefixed, sorted (name, value) pairs; order does not matter.

    Percent-escapes are decoded to the bytes they name (latin-1 both ways: one character a
    byte), so escapes that are not UTF-8 (``%FF``, ``%FE``) stay distinct, and a UTF-8 one
    gives the same bytes as before."""
    if not query_string:
        return b""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return b"".join(
        _lp(name.encode("latin-1")) + _lp(value.encode("latin-1")) for name, value in sorted(pairs)
    )


class Fingerprinter:
    """``fingerprint(method, path, query_string, body, api_version="") -> hex digest``."""

    def __init__(self, secret: bytes | str | None = None) -> None:
        if secret is None:
            secret = secrets.token_bytes(32)
        elif isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("the idempotency fingerprint secret must be at least 16 bytes")
        self._secret = secret

    def __call__(
        self, method: str, path: str, query_string: bytes, body: bytes, api_version: str = ""
    ) -> str:
        """``api_version``: the version the request was resolved to (a header, not the
        body, selects it, and another version may answer differently); empty: none."""
        parts = [
            b"aimw-idem-v1",
            _lp(method.upper().encode("ascii")),
            _lp(path.encode("utf-8", "surrogateescape")),
            _lp(canonical_query(query_string)),
            _lp(hashlib.sha256(body).digest()),
        ]
        if api_version:  # (appended only when set: other fingerprints are unchanged)
            parts.append(_lp(b"api-version:" + api_version.encode("utf-8", "surrogateescape")))
        return hmac.digest(self._secret, b"".join(parts), "sha256").hex()

    def __repr__(self) -> str:
        return "Fingerprinter(secret=***)"
