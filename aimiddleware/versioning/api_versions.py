"""API versions, independent of model versions: by header, by path prefix, or pinned.

Resolution order: a ``/v1``-style path prefix (when enabled), then the version header, then
the caller's pin (mapping or sync/async callable keyed by principal), then the global default.
Date-style versions (``2026-06-01``, with an optional ``.name`` or ``-preview`` suffix, as
Stripe and Azure write them) and path-style ones (``v1``, ``v2``) are both accepted.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

from starlette.concurrency import run_in_threadpool

from aimiddleware._asgi import is_async_callable
from aimiddleware.errors import InvalidRequest, UnsupportedApiVersion
from aimiddleware.headers import header_name
from aimiddleware.versioning.lifecycle import (
    Clock,
    DateLike,
    Lifecycle,
    retired_error,
    utc_now,
)

__all__ = [
    "ApiVersion",
    "ApiVersions",
    "PinResolver",
    "ResolvedVersion",
    "path_style",
    "well_formed",
]

PinResolver = Mapping[str, str] | Callable[[str], str | Awaitable[str | None] | None]
Source = Literal["path", "header", "pin", "default"]

_DATE_STYLE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[.\-][a-z0-9]{1,32})?\Z")
_PATH_STYLE = re.compile(r"^v\d{1,4}(?:\.\d{1,4})?\Z")
_PATH_PREFIX = re.compile(r"^/(v\d{1,4}(?:\.\d{1,4})?)(?=/|$)")


def path_style(version: str) -> bool:
    """``v1``, ``v2.1``: a version that can be a path prefix."""
    return bool(_PATH_STYLE.match(version))


def well_formed(version: str) -> bool:
    """A date-style version naming a real date, or a path-style ``v<n>``."""
    if _PATH_STYLE.match(version):
        return True
    m = _DATE_STYLE.match(version)
    if not m:
        return False
    try:
        date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ApiVersion:
    """One supported API version and its lifecycle."""

    name: str
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not well_formed(self.name):
            raise ValueError(
                f"API version {self.name!r} is malformed: use YYYY-MM-DD (optionally with a "
                "'.name' or '-preview' suffix) or v<n>"
            )

    @classmethod
    def deprecated(
        cls,
        name: str,
        *,
        deprecated: DateLike,
        sunset: DateLike | None = None,
        replacement: str | None = None,
        deprecation_link: str | None = None,
        sunset_link: str | None = None,
        successor_link: str | None = None,
    ) -> ApiVersion:
        return cls(
            name,
            Lifecycle.of(
                deprecated=deprecated,
                sunset=sunset,
                replacement=replacement,
                deprecation_link=deprecation_link,
                sunset_link=sunset_link,
                successor_link=successor_link,
            ),
        )


@dataclass(frozen=True)
class ResolvedVersion:
    version: ApiVersion
    source: Source
    path: str | None = None  # the request path with the version prefix removed

    @property
    def name(self) -> str:
        return self.version.name


class ApiVersions:
    """The supported API versions and how a request picks one.

    ``header``: request header carrying the version (``None``: no header selection).
    ``path_prefix``: accept ``/v1/...``; with ``strip_prefix`` the app sees ``/...`` and
    one endpoint serves every version (reading ``ctx.api_version``).
    ``pins``: per-principal default, a mapping or a sync/async ``(principal) -> version``.
    ``default``: the global default (the last listed version when omitted).
    ``echo_header``: response header carrying the resolved version (default: ``header``,
    else ``api-version``).
    """

    def __init__(
        self,
        versions: Iterable[str | ApiVersion],
        *,
        default: str | None = None,
        header: str | None = "api-version",
        path_prefix: bool = False,
        strip_prefix: bool = True,
        pins: PinResolver | None = None,
        echo_header: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(versions, (str, ApiVersion)):  # (a str was taken for its characters)
            shown = versions if isinstance(versions, str) else versions.name
            raise TypeError(f"versions takes a list of versions, such as [{shown!r}], "
                            f"got {versions!r}")
        self._versions: dict[str, ApiVersion] = {}
        for v in versions:
            version = v if isinstance(v, ApiVersion) else ApiVersion(v)
            if version.name in self._versions:
                raise ValueError(f"API version {version.name!r} is listed twice")
            self._versions[version.name] = version
        if not self._versions:
            raise ValueError("at least one API version is required")
        for version in self._versions.values():
            repl = version.lifecycle.replacement
            if repl is not None and repl not in self._versions:
                raise ValueError(f"replacement {repl!r} of {version.name!r} is not a version")
        self.default = default if default is not None else list(self._versions)[-1]
        if self.default not in self._versions:
            raise ValueError(f"default API version {self.default!r} is not a supported version")
        self.header = header_name("header", header) if header is not None else None
        if not isinstance(path_prefix, bool):  # ("/v1" was taken for True)
            raise TypeError("path_prefix is True (read the version from /v1/...) or False, "
                            f"got {path_prefix!r}")
        if header is None and not path_prefix:
            raise ValueError("choose a header, a path prefix, or both")
        if path_prefix and not any(path_style(name) for name in self._versions):
            raise ValueError("path_prefix=True needs a path-style version (v1, v2.1) "
                             "among the versions")
        self._header_bytes = self.header.encode("latin-1") if self.header else None
        if not isinstance(strip_prefix, bool):  # ("no" or "/v1" was taken for True)
            raise TypeError("strip_prefix is True (the app sees /chat for /v1/chat) or False "
                            f"(it sees /v1/chat), got {strip_prefix!r}")
        self.path_prefix = path_prefix
        self.strip_prefix = strip_prefix
        if isinstance(pins, Mapping):
            for principal, pinned in pins.items():
                if pinned not in self._versions:
                    raise ValueError(f"pin {pinned!r} for {principal!r} is not a version")
        elif pins is not None and not callable(pins):
            raise TypeError("pins must be a mapping or a callable (principal) -> version")
        self.pins = pins
        self._pins_async = pins is not None and is_async_callable(pins)
        if echo_header is not None:
            echo_header = header_name("echo_header", echo_header)
        self.echo_header = echo_header or self.header or "api-version"
        self.clock: Clock = clock or utc_now
        # Resolutions are immutable: build the header and default ones once.
        self._by_header = {n: ResolvedVersion(v, "header") for n, v in self._versions.items()}
        self._default = ResolvedVersion(self._versions[self.default], "default")

    @property
    def supported(self) -> list[str]:
        return list(self._versions)

    @property
    def versions(self) -> Mapping[str, ApiVersion]:
        return dict(self._versions)

    def _unsupported(self, value: str, where: str, param: str | None) -> UnsupportedApiVersion:
        # (a malformed value is not echoed: whatever bytes a client sent stay out of the body)
        if well_formed(value):
            shown, why = f"{value!r} ", "is not supported"
        else:
            shown, why = "", "is malformed"
        return UnsupportedApiVersion(
            f"The API version {shown}({where}) {why}. "
            f"Supported versions: {', '.join(self.supported)}.",
            param=param,
            extra={"supported_versions": self.supported},
        )

    async def _pin(self, principal: str) -> str | None:
        pins = self.pins
        if pins is None:
            return None
        if isinstance(pins, Mapping):
            return pins.get(principal)
        if self._pins_async:
            result: object = await pins(principal)  # type: ignore[misc]
        else:
            result = await run_in_threadpool(pins, principal)
        if result is not None and not isinstance(result, str):
            raise TypeError("a pins callable must return a version string or None")
        return result

    def pick(self, path: str, headers: Iterable[tuple[bytes, bytes]]) -> ResolvedVersion | None:
        """The version named by the path prefix or the header, else the default when no pins
        are configured; ``None`` when the caller's pin must be asked (use :meth:`resolve`).

        Raises 400 for an unknown or malformed version; no lifecycle (410) check: the caller
        does it, with :meth:`resolve` doing both.
        """
        if self.path_prefix:
            m = _PATH_PREFIX.match(path)
            if m:
                name = m.group(1)
                if name not in self._versions:
                    raise self._unsupported(name, "path prefix", None)
                rest = path[m.end():] or "/"
                return ResolvedVersion(
                    self._versions[name], "path", rest if self.strip_prefix else None
                )
        wanted = self._header_bytes
        if wanted is not None:
            found: ResolvedVersion | None = None
            for key, raw in headers:
                if key == wanted:
                    value = raw.decode("latin-1").strip()
                    named = self._by_header.get(value)
                    if named is None:
                        raise self._unsupported(value, f"header {self.header}", self.header)
                    if found is not None and named is not found:  # which one was meant?
                        raise InvalidRequest(
                            f"The {self.header} header was sent more than once, with "
                            "different versions.",
                            param=self.header,
                        )
                    found = named
            if found is not None:
                return found
        if self.pins is None:
            return self._default
        return None

    async def resolve(
        self, path: str, headers: Iterable[tuple[bytes, bytes]], principal: str,
        now: datetime | None = None,
    ) -> ResolvedVersion:
        """Pick the request's version; 400 if unknown or malformed, 410 after its sunset."""
        resolved = self.pick(path, headers)
        if resolved is None:
            pinned = await self._pin(principal)
            if pinned is not None:
                if pinned not in self._versions:
                    raise self._unsupported(pinned, "pinned for this caller", None)
                resolved = ResolvedVersion(self._versions[pinned], "pin")
            else:
                resolved = self._default
        lc = resolved.version.lifecycle
        if lc.status(now or self.clock()) == "retired":
            raise retired_error("API version", resolved.name, lc, param=self.header)
        return resolved
