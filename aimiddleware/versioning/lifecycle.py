"""Lifecycle of a versioned thing (model snapshot, API version, route) and its headers.

Pure: dates in, header values out. ``Deprecation`` is an RFC 9745 structured date
(``@<unix-seconds>``), ``Sunset`` an RFC 8594 HTTP-date, and ``Link`` carries the
``deprecation``, ``sunset`` and ``successor-version`` relations where configured.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from aimiddleware.errors import ModelRetired
from aimiddleware.headers import http_date, sf_date

__all__ = [
    "Clock",
    "DateLike",
    "Lifecycle",
    "Status",
    "as_utc",
    "merge_headers",
    "retired_error",
    "utc_now",
]

Clock = Callable[[], datetime]
DateLike = datetime | date | str
Status = Literal["active", "deprecated", "retired"]

_LINK_TARGET = re.compile(r"^[^\s<>\"]+$")


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: DateLike) -> datetime:
    """A ``datetime`` (naive = UTC), a ``date`` (midnight UTC) or an ISO 8601 string."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not an ISO 8601 date: {value!r}") from exc
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise TypeError(f"expected a datetime, date or ISO string, got {type(value).__name__}")


def _link(url: str | None, what: str) -> str | None:
    if url is None:
        return None
    if not url or not _LINK_TARGET.match(url):
        raise ValueError(f"{what} must be a URI without spaces, quotes or angle brackets")
    return url


@dataclass(frozen=True)
class Lifecycle:
    """When something was deprecated, when it goes away, and what replaces it.

    ``deprecated_at``: the deprecation date (past or future, as RFC 9745 allows).
    ``sunset_at``: from then on calls fail with 410. ``retired=True`` retires it now.
    ``replacement``: the name clients should move to (a snapshot or API version).
    ``deprecation_link``/``sunset_link``/``successor_link``: documentation URIs, sent as
    ``Link`` relations. Sunset earlier than Deprecation is rejected with ``ValueError``.
    """

    deprecated_at: datetime | None = None
    sunset_at: datetime | None = None
    replacement: str | None = None
    retired: bool = False
    deprecation_link: str | None = None
    sunset_link: str | None = None
    successor_link: str | None = None

    @classmethod
    def of(
        cls,
        *,
        deprecated: DateLike | None = None,
        sunset: DateLike | None = None,
        replacement: str | None = None,
        retired: bool = False,
        deprecation_link: str | None = None,
        sunset_link: str | None = None,
        successor_link: str | None = None,
    ) -> Lifecycle:
        """Build from loose dates (``date``, ``datetime`` or ISO strings)."""
        return cls(
            deprecated_at=as_utc(deprecated) if deprecated is not None else None,
            sunset_at=as_utc(sunset) if sunset is not None else None,
            replacement=replacement,
            retired=retired,
            deprecation_link=deprecation_link,
            sunset_link=sunset_link,
            successor_link=successor_link,
        )

    def __post_init__(self) -> None:
        for name in ("deprecated_at", "sunset_at"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, datetime):
                    raise TypeError(f"{name} must be a datetime (use Lifecycle.of for dates)")
                object.__setattr__(self, name, as_utc(value))
        if self.deprecated_at and self.sunset_at and self.sunset_at < self.deprecated_at:
            raise ValueError(
                f"Sunset ({self.sunset_at.isoformat()}) must not be earlier than Deprecation "
                f"({self.deprecated_at.isoformat()}) (RFC 9745 section 3)"
            )
        if self.replacement is not None and not self.replacement:
            raise ValueError("replacement must be a non-empty name or None")
        _link(self.deprecation_link, "deprecation_link")
        _link(self.sunset_link, "sunset_link")
        _link(self.successor_link, "successor_link")

    def status(self, now: datetime) -> Status:
        if self.retired or (self.sunset_at is not None and now >= self.sunset_at):
            return "retired"
        if self.deprecated_at is not None or self.sunset_at is not None:
            return "deprecated"
        return "active"

    @property
    def signals(self) -> bool:
        """Whether responses should carry deprecation headers at all."""
        return self.deprecated_at is not None or self.sunset_at is not None or self.retired

    def headers(self) -> list[tuple[str, str]]:
        """``Deprecation``, ``Sunset`` and ``Link`` for one deprecated thing."""
        return merge_headers([self])


def merge_headers(lifecycles: Iterable[Lifecycle]) -> list[tuple[str, str]]:
    """Headers for a response that used several deprecated things (say a model and a version).

    ``Deprecation`` and ``Sunset`` are single values: the earliest of each. Since every
    lifecycle has Sunset >= Deprecation, the earliest Sunset is >= the earliest Deprecation.
    A lifecycle that signals but has no deprecation date (retired or sunset-only) is
    announced as deprecated from its sunset date at the latest.
    """
    items: Sequence[Lifecycle] = [lc for lc in lifecycles if lc.signals]
    if not items:
        return []
    deps = [lc.deprecated_at or lc.sunset_at for lc in items]
    sunsets = [lc.sunset_at for lc in items if lc.sunset_at is not None]
    headers: list[tuple[str, str]] = []
    known = [d for d in deps if d is not None]
    if known:
        headers.append(("deprecation", sf_date(min(known))))
    else:  # retired=True with no dates: deprecated since the epoch is the honest lower bound
        headers.append(("deprecation", sf_date(0)))
    if sunsets:
        headers.append(("sunset", http_date(min(sunsets))))
    links: list[str] = []
    for lc in items:
        for url, rel in (
            (lc.deprecation_link, "deprecation"),
            (lc.sunset_link, "sunset"),
            (lc.successor_link, "successor-version"),
        ):
            if url is not None:
                entry = f'<{url}>; rel="{rel}"'
                if rel == "deprecation":
                    entry += '; type="text/html"'
                if entry not in links:
                    links.append(entry)
    if links:
        headers.append(("link", ", ".join(links)))
    return headers


def retired_error(kind: str, name: str, lc: Lifecycle, *, param: str | None) -> ModelRetired:
    """The 410 for a retired model or API version, naming its replacement."""
    detail = f"The {kind} {name!r} has been retired"
    if lc.sunset_at is not None:
        detail += f" since {lc.sunset_at.date().isoformat()}"
    detail += f"; use {lc.replacement!r} instead." if lc.replacement else "."
    key = "retired_" + kind.replace(" ", "_").lower()
    extra: dict[str, Any] = {"replacement": lc.replacement, key: name}
    if lc.sunset_at is not None:
        extra["sunset"] = lc.sunset_at.isoformat()
    return ModelRetired(detail, param=param, headers=lc.headers(), extra=extra)
