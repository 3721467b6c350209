"""What the stack adds to a FastAPI app's OpenAPI document.

Middleware is invisible to FastAPI's schema generation, so generated clients and schema
checkers would not know about the problem+json errors, the rate-limit headers or the
``Idempotency-Key`` header. :func:`patch_openapi` adds them to a schema dict (pure);
:func:`document_stack` makes a FastAPI app serve the patched document.

Routes that are plain Starlette routes or answered by middleware (``UsageRoutes``,
``JobsRouter``, the versioning layer's models and migration routes) are invisible too: each
describes itself with an ``openapi_paths()`` fragment (``{"paths": ..., "components":
...}``); :func:`merge_paths` merges one into a document (pure), :func:`add_paths` into a
FastAPI app's (before ``install()``, so the stack's additions reach them too).

The objects added (the ``Problem`` schema, the layers' headers, the ``Idempotency-Key``
parameter) and the builders those fragments are written with (:func:`problem_response`,
:func:`json_response`, :func:`fragment`...) are in ``aimiddleware._openapi_objects`` and
re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aimiddleware._openapi_objects import IDEMPOTENCY_PARAMETER as IDEMPOTENCY_PARAMETER
from aimiddleware._openapi_objects import (
    PROBLEM_SCHEMA,
    component_schemas,
    fragment,
    json_body,
    json_response,
    problem_response,
    ref,
)
from aimiddleware._openapi_objects import RATE_LIMIT_HEADERS as RATE_LIMIT_HEADERS
from aimiddleware._openapi_objects import REF_TEMPLATE as REF_TEMPLATE
from aimiddleware._openapi_objects import REPLAYED_HEADER as REPLAYED_HEADER
from aimiddleware._openapi_objects import REQUEST_ID_HEADER as REQUEST_ID_HEADER
from aimiddleware._openapi_objects import RETRY_HEADERS as RETRY_HEADERS
from aimiddleware._openapi_objects import SECURITY as SECURITY
from aimiddleware._openapi_objects import SECURITY_SCHEMES as SECURITY_SCHEMES
from aimiddleware._openapi_objects import USAGE_HEADERS as USAGE_HEADERS
from aimiddleware._openapi_objects import VERSION_HEADERS as VERSION_HEADERS

__all__ = [
    "PROBLEM_SCHEMA",
    "add_paths",
    "component_schemas",
    "document_stack",
    "fragment",
    "json_body",
    "json_response",
    "merge_paths",
    "patch_openapi",
    "problem_response",
    "ref",
]


def patch_openapi(
    schema: dict[str, Any],
    *,
    rate_limit_headers: bool = True,
    idempotency_methods: Iterable[str] = ("post", "patch"),
    rate_limit_exempt: Iterable[str] = (),
    usage_headers: bool = False,
    version_headers: bool = False,
    auth: bool = False,
) -> dict[str, Any]:
    """Add the stack's errors, headers and parameters to every operation of ``schema``.

    ``rate_limit_exempt``: the paths (or ``"/prefix/*"``) the rate limiter skips, as given to
    it: their operations get no rate-limit headers and no 429. ``usage_headers`` /
    ``version_headers``: document the usage layer's ``x-usage-*`` headers and the
    versioning layer's headers on success responses. ``auth``: document how the context
    layer's default rule tells callers apart (an optional bearer token or ``x-api-key``;
    without one, the caller's address) on every operation that declares no ``security``.
    """
    if auth:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes.update(SECURITY_SCHEMES)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    idem = {m.lower() for m in idempotency_methods}
    exempt = tuple(rate_limit_exempt)
    success: dict[str, Any] = dict(REQUEST_ID_HEADER)
    if usage_headers:
        success.update(USAGE_HEADERS)
    if version_headers:
        success.update(VERSION_HEADERS)
    for path, path_item in schema.get("paths", {}).items():
        limited_path = rate_limit_headers and not _exempt(path, exempt)
        for method, op in path_item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            keyed = method.lower() in idem
            responses: dict[str, Any] = op["responses"]
            for code, response in responses.items():
                if code.startswith("2"):
                    headers = response.setdefault("headers", {})
                    headers.update(success)
                    if limited_path:
                        headers.update(RATE_LIMIT_HEADERS)
                    if keyed:
                        headers.update(REPLAYED_HEADER)
            if "422" in responses:
                responses["422"] = problem_response(
                    "Request validation failed.", REQUEST_ID_HEADER
                )
            if limited_path:
                limited = {**REQUEST_ID_HEADER, **RETRY_HEADERS, **RATE_LIMIT_HEADERS}
                responses.setdefault(
                    "429", problem_response("Rate limited or quota exceeded.", limited)
                )
            if keyed:
                responses.setdefault("400", problem_response(
                    "Invalid request, such as a malformed Idempotency-Key.", REQUEST_ID_HEADER
                ))
                responses.setdefault("409", problem_response(
                    "A request with this Idempotency-Key is still in progress: retry later.",
                    {**REQUEST_ID_HEADER, **RETRY_HEADERS},
                ))
            responses.setdefault(
                "default", problem_response("Any other error, as problem+json.", REQUEST_ID_HEADER)
            )
            if auth:
                op.setdefault("security", SECURITY)
            if keyed:
                params = op.setdefault("parameters", [])
                if not any(p.get("name", "").lower() == "idempotency-key" for p in params):
                    params.append(IDEMPOTENCY_PARAMETER)
    # FastAPI's validation-error schemas are no longer used by any response.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def _exempt(path: str, exempt: tuple[str, ...]) -> bool:
    """``path`` (an OpenAPI path template) is one the rate limiter never limits."""
    return any(
        path.startswith(p[:-1]) if p.endswith("*") else path == p for p in exempt
    )


def document_stack(
    app: Any, *, paths: Iterable[Mapping[str, Any]] = (), **options: Any
) -> None:
    """Make a FastAPI app's ``/openapi.json`` describe what the stack adds.

    ``paths``: ``openapi_paths()`` fragments of routes the stack's layers answer (say the
    versioning layer's), merged in first; ``options`` go to :func:`patch_openapi`.
    """
    fragments = list(paths)
    _serve(app, lambda schema: patch_openapi(_merged(schema, fragments), **options))


def add_paths(app: Any, *fragments: Mapping[str, Any]) -> None:
    """Make a FastAPI app's ``/openapi.json`` document routes FastAPI cannot see.

    ``fragments``: ``openapi_paths()`` results, e.g. of the app's ``UsageRoutes`` and
    ``JobsRouter``. Call it before ``install()`` (or :func:`document_stack`), which then
    adds the stack's errors, headers and ``Idempotency-Key`` to these operations too.
    """
    _serve(app, lambda schema: _merged(schema, fragments))


def _serve(app: Any, build: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Make ``app.openapi()`` serve ``build`` of the document it served so far (built once)."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(original())
        return app.openapi_schema  # type: ignore[no-any-return]

    app.openapi = openapi


def _merged(schema: dict[str, Any], fragments: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    for part in fragments:
        schema = merge_paths(schema, part)
    return schema


def merge_paths(schema: dict[str, Any], fragment: Mapping[str, Any]) -> dict[str, Any]:
    """Merge an ``openapi_paths()`` fragment into ``schema`` (changed in place, returned).

    An operation ``schema`` already has (the app documented it itself) is kept. A component
    schema whose name ``schema`` already uses for a different schema (an app's own ``Job``
    model, say) is merged as ``aimiddleware.<name>``, and the fragment's references follow.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    renames: dict[str, str] = {}
    theirs: Mapping[str, Any] = fragment.get("components", {}).get("schemas", {})
    for name, component in theirs.items():
        if name in components and components[name] != component:
            renames[name] = f"aimiddleware.{name}"
    if renames:
        fragment = _renamed(fragment, {
            REF_TEMPLATE.format(model=old): REF_TEMPLATE.format(model=new)
            for old, new in renames.items()
        })
        theirs = fragment.get("components", {}).get("schemas", {})
    for name, component in theirs.items():
        components.setdefault(renames.get(name, name), component)
    paths = schema.setdefault("paths", {})
    for path, item in fragment.get("paths", {}).items():
        merged = paths.setdefault(path, {})
        for method, operation in item.items():
            merged.setdefault(method, operation)
    return schema


def _renamed(value: Any, refs: Mapping[str, str]) -> Any:
    """A deep copy of ``value`` whose ``$ref`` values found in ``refs`` are replaced."""
    if isinstance(value, Mapping):
        return {
            k: refs.get(v, v) if k == "$ref" and isinstance(v, str) else _renamed(v, refs)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_renamed(v, refs) for v in value]
    return value
