"""The ``Idempotency-Key`` header: parsing and validation (pure).

Modelled on draft-ietf-httpapi-idempotency-key-header §2.1: the value is an RFC 8941
sf-string (``"8e03978e-40d5-43e8-bc93-6894a57f9324"``). Stripe and most SDKs send the key
unquoted, so a bare token is accepted too. Either way the key is 1 to 255 printable ASCII
characters; anything else is an :class:`~aimiddleware.errors.InvalidRequest` (400).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aimiddleware.errors import InvalidRequest

__all__ = ["MAX_KEY_LENGTH", "find_key", "parse_key"]

MAX_KEY_LENGTH = 255

# Visible ASCII (0x21-0x7E) without '"' and '\\'.
_BARE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _invalid(why: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid Idempotency-Key: {why}. Send a quoted string (\"...\") or a bare token of "
        f"1-{MAX_KEY_LENGTH} printable ASCII characters, for example a UUID.",
        param="Idempotency-Key",
    )


def parse_key(raw: bytes | str) -> str:
    """The key carried by one header value; raises ``InvalidRequest`` when malformed."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _invalid("it contains non-ASCII bytes") from None
    else:
        text = raw
    text = text.strip(" \t")
    if not text:
        raise _invalid("it is empty")
    if text.startswith('"'):
        key = _parse_sf_string(text)
    else:
        if not _BARE.fullmatch(text):
            raise _invalid("a bare key may contain only visible ASCII, no spaces, quotes or '\\'")
        key = text
    if not key:
        raise _invalid("it is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise _invalid(f"it is longer than {MAX_KEY_LENGTH} characters")
    return key


def _parse_sf_string(text: str) -> str:
    """RFC 8941 §4.2.5 sf-string; nothing may follow the closing quote (no parameters)."""
    out: list[str] = []
    i, n = 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n or text[i + 1] not in '"\\':
                raise _invalid("a quoted key may only escape '\"' and '\\'")
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            if i != n - 1:
                raise _invalid("nothing may follow the closing quote")
            return "".join(out)
        if not ("\x20" <= ch <= "\x7e"):
            raise _invalid("a quoted key may contain only printable ASCII")
        out.append(ch)
        i += 1
    raise _invalid("the quoted string is not closed")


def find_key(
    headers: Iterable[tuple[bytes, bytes]], name: bytes = b"idempotency-key"
) -> str | None:
    """The key from raw ASGI headers, ``None`` if absent; several values are a 400."""
    found: bytes | None = None
    for key, value in headers:
        if key == name:
            if found is not None:
                raise _invalid("the header was sent more than once")
            found = value
    return None if found is None else parse_key(found)
