"""``VersioningMiddleware``: API version, model alias to snapshot, deprecation headers, 410.

Sits right inside the error layer. Per request it resolves the API version and the model
(raising typed errors: 400 ``unsupported_api_version``, 404 for an unknown model, 410
``model_retired`` after a sunset), writes ``ctx.api_version``, ``ctx.model`` (as requested)
and ``ctx.model_version`` (as served), counts deprecated use per principal, and adds the
echo and ``Deprecation``/``Sunset``/``Link`` headers to the response start. It can also
answer two helper routes: a models list and a migration check (both off by default).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from aimiddleware._asgi import route_path, send_json
from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.errors import DEFAULT_TYPE_BASE, InvalidRequest, MethodNotAllowed, NotFound
from aimiddleware.headers import header_name, parse_http_date, parse_sf_date
from aimiddleware.storage import Storage
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send
from aimiddleware.versioning.api_versions import ApiVersions, ResolvedVersion
from aimiddleware.versioning.lifecycle import (
    Clock,
    Lifecycle,
    merge_headers,
    retired_error,
    utc_now,
)
from aimiddleware.versioning.monitor import (
    DeprecatedCall,
    DeprecationHook,
    DeprecationMonitor,
    Kind,
)
from aimiddleware.versioning.registry import ModelRegistry

__all__ = ["VersioningMiddleware"]


@dataclass
class _Used:
    kind: Kind
    name: str
    lifecycle: Lifecycle


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_READS = frozenset({"GET", "HEAD"})  # the models routes answer both (HEAD: headers only)


class VersioningMiddleware:
    """API versions and model pinning for every route of an app.

    ``versions``: an :class:`ApiVersions` policy (``None``: no API versioning).
    ``registry``: a :class:`ModelRegistry` (``None``: no model resolution). The model is read
    from the JSON body field ``model_field`` or else the request header ``model_header``;
    the response echoes ``model_echo_header`` (as requested) and ``model_version_header``
    (the snapshot). A request that names no model passes through untouched.
    ``monitor`` (or ``storage`` + ``on_deprecated``): where deprecated calls are counted.
    ``models_path`` (e.g. ``"/v1/models"``) and ``migration_path`` turn on the helper routes.
    ``clock``: the current time (defaults to the registry's, then the versions', then UTC now).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        versions: ApiVersions | None = None,
        registry: ModelRegistry | None = None,
        model_field: str | None = "model",
        model_header: str | None = "x-model",
        model_echo_header: str | None = "x-model",
        model_version_header: str | None = "x-model-version",
        storage: Storage | str | None = None,
        monitor: DeprecationMonitor | None = None,
        on_deprecated: DeprecationHook | None = None,
        models_path: str | None = None,
        migration_path: str | None = None,
        clock: Clock | None = None,
        error_type_base: str = DEFAULT_TYPE_BASE,
    ) -> None:
        check_options(versions, registry, model_field, model_header, models_path,
                      migration_path)
        if monitor is not None and (storage is not None or on_deprecated is not None):
            raise ValueError("pass either monitor, or storage/on_deprecated, not both")
        self.app = app
        self.versions = versions
        self.registry = registry
        self.model_field = model_field
        self.model_header = model_header.lower() if model_header else None
        self._model_header_b = self.model_header.encode("latin-1") if self.model_header else None
        self.model_echo_header = model_echo_header.lower() if model_echo_header else None
        self.model_version_header = model_version_header.lower() if model_version_header else None
        self.monitor = monitor or DeprecationMonitor(storage, hook=on_deprecated)
        self.models_path = models_path
        self._model_prefix = (models_path or "").rstrip("/") + "/"  # GET {models_path}/{id}
        self.migration_path = migration_path
        self.clock: Clock = clock or self._owner_clock
        self.type_base = error_type_base
        # Per-instance caches (configuration-derived, never per-request state).
        self._version_info = _version_infos(versions)
        self._models: dict[str, _ModelInfo] = {}
        self._models_generation = -1
        self._merged: dict[tuple[tuple[str, str], ...], tuple[tuple[bytes, bytes], ...]] = {}
        names = {b"deprecation", b"sunset", b"link", b"vary"}
        for header in (model_echo_header, model_version_header):
            if header:
                names.add(header.lower().encode("latin-1"))
        if versions is not None:
            names.add(versions.echo_header.encode("latin-1"))
        self._added_names = frozenset(names)

    def _owner_clock(self) -> datetime:
        """The registry's clock, else the versions' (read per call, so either can be swapped)."""
        if self.registry is not None:
            return self.registry.clock()
        if self.versions is not None:
            return self.versions.clock()
        return utc_now()

    async def deprecation_counts(self, principal: str) -> dict[str, int]:
        """Deprecated calls made by ``principal``, per ``kind:name``."""
        return await self.monitor.counts(principal)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get("state", {}).get(SCOPE_KEY)
        if ctx is None:
            raise RuntimeError("VersioningMiddleware needs RequestContextMiddleware outside it")
        path = route_path(scope)
        # (first: a migration_path under models_path is not a model id)
        if self.migration_path is not None and path == self.migration_path:
            if scope["method"] != "POST":
                raise MethodNotAllowed(headers=[("allow", "POST")])
            from aimiddleware.versioning.migration import run_migration_check

            await run_migration_check(self, scope, ctx, send)
            return
        if self.is_helper_route(path, scope["method"]):  # (the models route: migration is above)
            if scope["method"] not in _READS:
                raise MethodNotAllowed(headers=[("allow", "GET, HEAD")])
            if self.registry is not None:  # always true: checked in __init__
                listed = self.registry.as_openai_list(self.clock())
                if path != self.models_path:  # GET /models/{id}: one entry, as OpenAI's
                    model_id = path[len(self._model_prefix):]
                    found = [m for m in listed["data"] if m["id"] == model_id]
                    if not found:
                        raise NotFound(f"The model {model_id[:200]!r} does not exist.",
                                       param="model")
                    listed = found[0]
                await send_json(send, 200, json.dumps(listed).encode(),
                                head=scope["method"] == "HEAD")
                return
        await self.serve(scope, receive, send, ctx)

    def requested_model(self, scope: Scope, ctx: RequestContext) -> str | None:
        """The model the request names: the JSON body field, else the model header.

        Only a method that carries a body names one in it: a ``GET`` or ``TRACE`` with a
        JSON body reaches the app, which answers what its routing says (a 405, a 404)."""
        if self.model_field is not None and scope["method"] in _BODY_METHODS:
            data = ctx.json()
            if isinstance(data, dict) and self.model_field in data:
                value: object = data[self.model_field]
                if not isinstance(value, str) or not value:
                    raise InvalidRequest(
                        f"'{self.model_field}' must be a non-empty string.", param=self.model_field
                    )
                return value
        if self._model_header_b is not None:
            for key, raw in scope["headers"]:
                if key == self._model_header_b:
                    named: str = raw.decode("latin-1").strip()
                    if named:
                        return named
        return None

    async def serve(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext) -> None:
        """Resolve, then call the app with the headers added (also used by the migration check)."""
        scope, raw = await self.resolve(scope, ctx)
        if not raw:
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": self.add_headers(message.get("headers", ()), raw)}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def is_helper_route(self, path: str, method: str = "GET") -> bool:
        """Does this layer answer ``method path`` itself: the migration check, the models
        list (any method: 405 but GET and HEAD), or ``GET {models_path}/{id}`` (every GET or
        HEAD under it is a model id, which may hold '/'; other methods there are the app's)?"""
        if path == self.migration_path:
            return True
        return self.models_path is not None and (
            path == self.models_path
            or (method in _READS and path.startswith(self._model_prefix))
        )

    async def resolve(
        self, scope: Scope, ctx: RequestContext
    ) -> tuple[Scope, tuple[tuple[bytes, bytes], ...]]:
        """Resolve the API version and the model into ``ctx`` (raising the typed errors);
        the scope to call the app with and the raw headers to add to its response.

        The common case (an active version and model) reads no clock and builds nothing:
        lifecycle facts, encoded echo headers and merged deprecation headers are computed
        once per version, model name and combination.
        """
        resolved = self.resolve_now(scope, ctx)
        if resolved is None:  # a version pin to look up in the store
            assert self.versions is not None
            local = route_path(scope)
            now = self.clock()
            rv = await self.versions.resolve(local, scope["headers"], ctx.principal, now)
            resolved = self._apply(scope, ctx, local, rv, now)
        scope, raw, deprecated = resolved
        if deprecated:
            await self.record(ctx, deprecated)
        return scope, raw

    def resolve_now(
        self, scope: Scope, ctx: RequestContext
    ) -> tuple[Scope, tuple[tuple[bytes, bytes], ...], tuple[DeprecatedCall, ...]] | None:
        """:meth:`resolve` without a coroutine: ``(scope, raw headers, deprecated calls to
        :meth:`record`)``, or None (nothing changed) when a version pin must be looked up."""
        versions = self.versions
        if versions is None:
            return self._apply(scope, ctx, scope["path"], None, None)
        local = route_path(scope)
        rv = versions.pick(local, scope["headers"])
        if rv is None:  # the caller's pin decides: resolve() looks it up and checks it
            return None
        return self._apply(scope, ctx, local, rv, None)

    async def record(self, ctx: RequestContext, deprecated: tuple[DeprecatedCall, ...]) -> None:
        """Record the deprecated calls :meth:`resolve_now` found (once the request has ended:
        :meth:`DeprecationMonitor.record_later`)."""
        await self.monitor.record_later(ctx, deprecated)

    def _apply(
        self,
        scope: Scope,
        ctx: RequestContext,
        local: str,
        rv: ResolvedVersion | None,
        now: datetime | None,
    ) -> tuple[Scope, tuple[tuple[bytes, bytes], ...], tuple[DeprecatedCall, ...]]:
        raw: tuple[tuple[bytes, bytes], ...] = ()
        used: list[_Used] | None = None
        if rv is not None:
            assert self.versions is not None
            info = self._version_info[rv.name]
            if info.can_retire:
                if now is None:
                    now = self.clock()
                if info.lifecycle.status(now) == "retired":
                    raise retired_error("API version", rv.name, info.lifecycle,
                                        param=self.versions.header)
            ctx.api_version = rv.name
            raw = info.raw
            if rv.path is not None:
                path = scope["path"]
                scope = _with_path(scope, path[: len(path) - len(local)], "/" + rv.name, rv.path)
            if info.signals:
                used = [_Used("api_version", rv.name, info.lifecycle)]
        if self.registry is not None:
            name = self.requested_model(scope, ctx)
            if name is not None:
                model = self._models.get(name)
                if model is None or model.generation != self.registry.generation:
                    model = self._model_info(name)
                if model.can_retire:
                    if now is None:
                        now = self.clock()
                    if model.lifecycle.status(now) == "retired":
                        raise retired_error("model", model.version, model.lifecycle,
                                            param="model")
                ctx.model = name
                ctx.model_version = model.version
                raw = raw + model.raw if raw else model.raw
                if model.signals:
                    if used is None:
                        used = []
                    used.append(_Used("model", model.version, model.lifecycle))
        if used is None:
            return scope, raw, ()
        raw = raw + self._deprecation_headers(used)
        if now is None:
            now = self.clock()
        ctx.state.setdefault("versioning", {})["deprecated"] = [
            f"{u.kind}:{u.name}" for u in used
        ]
        calls = tuple(DeprecatedCall.of(ctx, u.kind, u.name, u.lifecycle, now) for u in used)
        return scope, raw, calls

    def add_headers(
        self, headers: Iterable[tuple[bytes, bytes]], raw: tuple[tuple[bytes, bytes], ...]
    ) -> list[tuple[bytes, bytes]]:
        """``headers`` (a response's) with ``raw`` added; one the endpoint set itself (say a
        ``@deprecated`` route) is kept, except ``link`` and ``vary``, which add up, and a
        ``Deprecation`` or ``Sunset`` later than ours, which gives way to the earlier date."""
        out = list(headers)
        added = self._added_names
        for key, _ in out:
            if key.lower() in added:  # rare: the endpoint set one of ours itself
                return _merge(out, raw)
        out.extend(raw)
        return out

    def _model_info(self, name: str) -> _ModelInfo:
        """Build (and cache) what serving ``name`` needs; ``NotFound`` if unknown."""
        registry = self.registry
        assert registry is not None
        generation = registry.generation
        resolved = registry.lookup(name)
        lc = resolved.snapshot.lifecycle
        pairs: list[tuple[bytes, bytes]] = []
        if self.model_echo_header:
            pairs.append((self.model_echo_header.encode("latin-1"), name.encode("latin-1")))
        if self.model_version_header:
            pairs.append(
                (self.model_version_header.encode("latin-1"), resolved.version.encode("latin-1"))
            )
        info = _ModelInfo(
            generation, resolved.version, lc, lc.signals,
            lc.retired or lc.sunset_at is not None, tuple(pairs),
        )
        if self._models_generation != generation:  # snapshots or aliases changed: start over
            self._models.clear()
            self._merged.clear()
            self._models_generation = generation
        self._models[name] = info  # only names the registry knows: bounded by its size
        return info

    def _deprecation_headers(self, used: list[_Used]) -> tuple[tuple[bytes, bytes], ...]:
        """``Deprecation``/``Sunset``/``Link`` for this combination, encoded once."""
        key = tuple((u.kind, u.name) for u in used)
        found = self._merged.get(key)
        if found is None:
            found = self._merged[key] = tuple(
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in merge_headers(u.lifecycle for u in used)
            )
        return found


@dataclass(frozen=True)
class _VersionInfo:
    lifecycle: Lifecycle
    signals: bool
    can_retire: bool
    raw: tuple[tuple[bytes, bytes], ...]  # the echo (and Vary) headers, encoded


@dataclass(frozen=True)
class _ModelInfo:
    generation: int  # the registry's, when built
    version: str
    lifecycle: Lifecycle
    signals: bool
    can_retire: bool
    raw: tuple[tuple[bytes, bytes], ...]  # the echo headers, encoded


def _version_infos(versions: ApiVersions | None) -> dict[str, _VersionInfo]:
    if versions is None:
        return {}
    infos: dict[str, _VersionInfo] = {}
    for name, version in versions.versions.items():
        pairs = [(versions.echo_header.encode("latin-1"), name.encode("latin-1"))]
        if versions.header is not None:
            pairs.append((b"vary", versions.header.encode("latin-1")))
        lc = version.lifecycle
        infos[name] = _VersionInfo(
            lc, lc.signals, lc.retired or lc.sunset_at is not None, tuple(pairs)
        )
    return infos


def _merge(
    headers: list[tuple[bytes, bytes]], raw: tuple[tuple[bytes, bytes], ...]
) -> list[tuple[bytes, bytes]]:
    """Add ``raw`` to ``headers`` unless the endpoint set one already (``link``/``vary`` add);
    of two ``Deprecation`` or ``Sunset`` dates (a ``@deprecated`` route serving a deprecated
    model), the earlier one, as :func:`merge_headers` does for a model and a version."""
    present: dict[bytes, int] = {}
    for i, (k, _) in enumerate(headers):
        present.setdefault(k.lower(), i)
    for key, value in raw:
        if key in present and key not in (b"link", b"vary"):
            i = present[key]  # the endpoint (say a @deprecated route) already set it
            if key in _DATE_HEADERS and _earlier(key, value, headers[i][1]):
                headers[i] = (headers[i][0], value)
            continue
        headers.append((key, value))
    return headers


_DATE_HEADERS = (b"deprecation", b"sunset")


def _moment(key: bytes, value: bytes) -> float | None:
    """A ``Deprecation`` (sf-date ``@<seconds>``) or ``Sunset`` (HTTP-date) in Unix seconds."""
    text = value.decode("latin-1")
    try:
        return parse_sf_date(text) if key == b"deprecation" else parse_http_date(text).timestamp()
    except ValueError:
        return None


def _earlier(key: bytes, ours: bytes, theirs: bytes) -> bool:
    """Is our date earlier than the one the endpoint set? (Not if theirs is unreadable.)"""
    mine, other = _moment(key, ours), _moment(key, theirs)
    return mine is not None and other is not None and mine < other


def _with_path(scope: Scope, root: str, prefix: str, rest: str) -> Scope:
    """A copy of ``scope`` whose path lost the version ``prefix`` (``/v1``) after ``root``."""
    new = dict(scope)
    raw = scope.get("raw_path")
    head = (root + prefix).encode("utf-8")
    if isinstance(raw, bytes) and raw.startswith(head):
        new["raw_path"] = root.encode("utf-8") + (raw[len(head):] or b"/")
    new["path"] = root + rest
    return new


def check_options(
    versions: object, registry: object, model_field: object, model_header: object,
    models_path: str | None, migration_path: str | None,
) -> None:
    """The layer's options checked (TypeError / ValueError), by the layer and by
    ``VersioningConfig`` when it is made (Starlette builds the layer on the first call)."""
    if versions is not None and not isinstance(versions, ApiVersions):
        raise TypeError("versions must be an ApiVersions")
    if registry is not None and not isinstance(registry, ModelRegistry):
        raise TypeError("registry must be a ModelRegistry")
    if versions is None and registry is None:
        raise ValueError("VersioningMiddleware needs versions, a registry, or both")
    if registry is not None and model_field is None and model_header is None:
        raise ValueError("a registry needs model_field or model_header to find the model")
    for name, path in (("models_path", models_path), ("migration_path", migration_path)):
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ValueError(f"{name} must start with '/' (a path), got {path!r}")
    if models_path is not None and not models_path.strip("/"):
        raise ValueError("models_path must name a path, e.g. '/v1/models' (every GET "
                         "under it is a model id)")
    if models_path is not None and models_path == migration_path:
        raise ValueError("models_path and migration_path must differ")
    if models_path is not None and registry is None:
        raise ValueError("models_path needs a registry")
    if model_header is not None:
        header_name("model_header", model_header)
