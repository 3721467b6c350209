"""The migration check: one request, run against two snapshots or two API versions.

``POST <migration_path>`` with::

    {"path": "/v1/chat", "method": "POST", "body": {...},
     "baseline": {"model": "my-model-2026-01-15"},
     "candidate": {"model": "my-model-2026-06-01"}}

(each side may name a ``model``, an ``api_version``, or both). The app below the versioning
layer is called in-process twice, as the caller (same principal, so the same quotas apply),
and both responses come back side by side with the differences in usage, cost,
finish_reason and output. Sides run one after the other, never in parallel.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aimiddleware._asgi import send_json
from aimiddleware._problem import shown
from aimiddleware.context import SCOPE_KEY, RequestContext, _reset_current, _set_current
from aimiddleware.errors import AIError, ExceptionMapper, ValidationFailed, render_problem
from aimiddleware.headers import is_header_name
from aimiddleware.types import Message, Scope
from aimiddleware.versioning.api_versions import path_style
from aimiddleware.versioning.diff import (
    compare,
    finish_reason_from,
    output_from,
    usage_from,
)

if TYPE_CHECKING:
    from aimiddleware.versioning.middleware import VersioningMiddleware

__all__ = ["MigrationRequest", "MigrationSide", "run_migration_check"]

# Headers the caller's request keeps for both sides; identity is fixed by the outer request.
_DROP = {
    b"content-length",
    b"content-type",
    b"idempotency-key",
    b"transfer-encoding",
    b"expect",
}
_FORBIDDEN_OVERRIDES = {"authorization", "x-api-key", "cookie", "host", "content-length"}


class MigrationSide(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str | None = Field(default=None, min_length=1, max_length=128)
    api_version: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _something(self) -> MigrationSide:
        if self.model is None and self.api_version is None:
            raise ValueError("each side needs a model, an api_version, or both")
        return self


class MigrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = Field(min_length=1, max_length=2048, pattern=r"^/[^\s#]*$")
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)
    baseline: MigrationSide
    candidate: MigrationSide


async def run_migration_check(
    mw: VersioningMiddleware, scope: Scope, ctx: RequestContext, send: Any
) -> None:
    try:
        req = MigrationRequest.model_validate(ctx.json())
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = shown(".".join(str(p) for p in first["loc"])) or None  # (a key sent)
        raise ValidationFailed(f"Invalid migration check: {first['msg']}.", param=loc) from None
    target = req.path.split("?", 1)[0]
    if mw.is_helper_route(target, req.method):
        raise ValidationFailed("The migration check cannot target a helper route.", param="path")
    for name in req.headers:
        if not is_header_name(name):  # (RFC 9110: a token; no space, colon or control)
            raise ValidationFailed(f"{shown(name)!r} is not a header name.", param="headers")
        if name.lower() in _FORBIDDEN_OVERRIDES:
            raise ValidationFailed(f"Header {name!r} cannot be overridden.", param="headers")
    sides = {}
    for label, side in (("baseline", req.baseline), ("candidate", req.candidate)):
        sides[label] = await _run_side(mw, scope, ctx, req, side, label)
    result = {"object": "migration_check", "method": req.method, "path": req.path, **sides}
    result["diff"] = compare(sides["baseline"], sides["candidate"])
    await send_json(send, 200, json.dumps(result, default=str).encode())


async def _run_side(
    mw: VersioningMiddleware,
    scope: Scope,
    ctx: RequestContext,
    req: MigrationRequest,
    side: MigrationSide,
    label: str,
) -> dict[str, Any]:
    path, _, query = req.path.partition("?")
    body = req.body
    headers = [(k, v) for k, v in scope["headers"] if k not in _DROP]
    overrides = {
        k.lower().encode("latin-1"): _latin1(v, "headers") for k, v in req.headers.items()
    }
    if side.model is not None:
        if mw.model_field is not None and (isinstance(body, dict) or body is None):
            body = {**(body or {}), mw.model_field: side.model}
        elif mw.model_header is not None:
            overrides[mw.model_header.encode("latin-1")] = _latin1(side.model, f"{label}.model")
        else:
            raise ValidationFailed("This endpoint's body cannot carry a model.", param="body")
    if side.api_version is not None:
        versions = mw.versions
        if versions is None:
            raise ValidationFailed("API versioning is not enabled.", param=f"{label}.api_version")
        if versions.path_prefix and path_style(side.api_version):
            path = _swap_prefix(path, side.api_version)
        elif versions.header is not None:
            overrides[versions.header.encode("latin-1")] = _latin1(
                side.api_version, f"{label}.api_version"
            )
        else:
            raise ValidationFailed("Only v<n> versions can be chosen by path.", param=label)
    headers = [(k, v) for k, v in headers if k not in overrides] + list(overrides.items())
    raw_body = json.dumps(body).encode() if body is not None else b""
    if raw_body:
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(raw_body)).encode()))
    sub = RequestContext(
        request_id=f"{ctx.request_id}.{label}",
        principal=ctx.principal,
        method=req.method,
        path=path,
        body=raw_body,
        traceparent_header=ctx.trace.traceparent,
    )
    full = scope.get("root_path", "") + path  # (an ASGI path includes the root path)
    sub_scope: Scope = {
        **scope,
        "method": req.method,
        "path": full,
        "raw_path": full.encode("utf-8"),
        "query_string": _latin1(query, "path"),
        "headers": headers,
        "state": {**scope.get("state", {}), SCOPE_KEY: sub},
    }
    status = 500
    resp_headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    done = anyio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw_body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def collect(message: Message) -> None:
        nonlocal status, resp_headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            resp_headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    token = _set_current(sub)
    try:
        await mw.serve(sub_scope, receive, collect, sub)
    except Exception as exc:  # render like the error layer would, for this side only
        err = exc if isinstance(exc, AIError) else ExceptionMapper().map(exc)
        status, resp_headers, problem = render_problem(
            err, request_id=sub.request_id, type_base=mw.type_base
        )
        chunks = [problem]
    finally:
        done.set()
        _reset_current(token)
    return _envelope(sub, status, resp_headers, b"".join(chunks))


def _latin1(value: str, param: str) -> bytes:
    """``value`` as a header (or query string) byte string; a 422 if it cannot be one."""
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raw = None
    if raw is None or b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ValidationFailed(
            "Header values and the query string must be Latin-1 text without line breaks.",
            param=param,
        )
    return raw


def _swap_prefix(path: str, version: str) -> str:
    parts = path.split("/", 2)
    if len(parts) > 1 and parts[1][:1] == "v" and parts[1][1:].replace(".", "").isdigit():
        rest = "/" + parts[2] if len(parts) > 2 else ""
    else:
        rest = path if path != "/" else ""
    return f"/{version}{rest}"


def _envelope(
    sub: RequestContext, status: int, headers: list[tuple[bytes, bytes]], raw: bytes
) -> dict[str, Any]:
    try:
        body: Any = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep too
        body = raw.decode("utf-8", "replace")
    data = body if isinstance(body, dict) else {}
    usage = sub.usage.model_dump() if sub.usage is not None else usage_from(data.get("usage"))
    cost = sub.estimated_cost if sub.estimated_cost is not None else data.get("estimated_cost")
    return {
        "status": status,
        "model": sub.model,
        "model_version": sub.model_version or data.get("model_version"),
        "api_version": sub.api_version,
        "usage": usage,
        "estimated_cost": str(cost) if cost is not None else None,
        "finish_reason": sub.finish_reason or sub.raw_finish_reason or finish_reason_from(data),
        "output": output_from(body),
        "headers": {
            k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k != b"set-cookie"
        },
        "body": body,
    }
