"""Header values as pure functions: RFC 8941 structured fields, HTTP-dates, durations."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

__all__ = [
    "go_duration",
    "http_date",
    "parse_http_date",
    "parse_sf_date",
    "sf_date",
    "sf_string",
]

_SF_STRING_OK = re.compile(r"^[\x20-\x7e]*\Z")


def sf_string(value: str) -> str:
    """An RFC 8941 sf-string: quoted, with ``\\`` and ``"`` escaped; printable ASCII only."""
    if not _SF_STRING_OK.match(value):
        raise ValueError("sf-string values must be printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sf_date(moment: datetime | float) -> str:
    """An RFC 9651 Date item (``@<unix-seconds>``), as RFC 9745 ``Deprecation`` wants."""
    ts = moment.timestamp() if isinstance(moment, datetime) else moment
    return f"@{math.floor(ts)}"


def parse_sf_date(value: str) -> int:
    """An RFC 9651 Date item (``@<integer>``) in Unix seconds; ``ValueError`` otherwise."""
    text = value.strip()
    digits = text[1:].removeprefix("-")
    if text[:1] != "@" or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"not an sf-date: {value!r}")
    return int(text[1:])


def http_date(moment: datetime | float) -> str:
    """An IMF-fixdate (RFC 9110 5.6.7), for example ``Sun, 30 Jun 2024 23:59:59 GMT``."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def parse_http_date(value: str) -> datetime:
    """Parse an HTTP-date into an aware UTC datetime; ``ValueError`` if it is not one."""
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, OverflowError) as exc:  # (past year 9999 once in UTC)
        raise ValueError(f"not an HTTP-date: {value!r}") from exc


def go_duration(seconds: float) -> str:
    """A Go-style duration as OpenAI's ``x-ratelimit-reset-*`` use: ``12ms``, ``1s``, ``6m0s``.

    Sub-second values are whole milliseconds (rounded up, so a reset is never early);
    longer ones are hours, minutes and seconds, with seconds to at most three decimals.
    """
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    millis = math.ceil(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def header_name(option: str, value: object) -> str:
    """``value`` checked as an HTTP header name (an RFC 9110 token), lower-cased; a
    TypeError or ValueError naming ``option`` otherwise (configuration, not requests)."""
    if not isinstance(value, str):
        raise TypeError(f"{option} must be a header name such as 'x-model', got {value!r}")
    if not is_header_name(value):
        raise ValueError(f"{option} must be a header name (letters, digits, '-'...), "
                         f"got {value!r}")
    return value.lower()


def is_header_name(value: str) -> bool:
    """Whether ``value`` is an HTTP header name (an RFC 9110 token)."""
    return bool(_TOKEN.match(value))
