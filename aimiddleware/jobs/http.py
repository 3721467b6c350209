"""HTTP edges of the jobs API: request bodies, the Idempotency-Key header, typed errors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from aimiddleware._problem import shown
from aimiddleware.context import current_or_none, report_no_model_call
from aimiddleware.errors import AIError, InvalidRequest, render_problem
from aimiddleware.jobs.models import BatchItem

__all__ = ["SubmitBatch", "SubmitJob", "idempotency_key", "parse_body", "typed_errors"]

M = TypeVar("M", bound=BaseModel)


class SubmitJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Any = None
    callback_url: str | None = Field(default=None, max_length=2048)


class SubmitBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[BatchItem] = Field(min_length=1, max_length=100_000)
    callback_url: str | None = Field(default=None, max_length=2048)


def idempotency_key(request: Request) -> str | None:
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':  # RFC 8941 sf-string, or bare (Stripe)
        key = key[1:-1]
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable characters.",
                             param="Idempotency-Key")
    return key


def typed_errors(
    fn: Callable[[Request], Awaitable[Response]], *, no_tokens: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """Render typed errors here, so the router works with or without ErrorMiddleware.

    ``no_tokens``: the request itself calls no model (:func:`report_no_model_call`: a rate
    limiter charges it one request, or nothing if it fails): the jobs' model calls are
    charged as they are made."""

    async def endpoint(request: Request) -> Response:
        ctx = current_or_none()
        if ctx is not None:
            if no_tokens:
                report_no_model_call(ctx)
            else:
                # The usage in a job's JSON and events is the job's (recorded on the job):
                # the usage layer must not take it for this request's.
                ctx.state["usage_reported"] = True
        try:
            return await fn(request)
        except AIError as err:
            status, headers, body = render_problem(err, request_id=ctx.request_id if ctx else None)
            resp = Response(body, status_code=status)
            resp.raw_headers = headers
            return resp

    return endpoint


async def parse_body(request: Request, model: type[M]) -> tuple[M, str]:
    """The validated body (typed 400 otherwise) and its fingerprint for idempotency."""
    raw = await request.body()
    try:
        parsed = model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        param = shown(".".join(str(p) for p in first.get("loc", ()))) or None  # (a key sent)
        raise InvalidRequest(f"Invalid request body: {first.get('msg')}.", param=param) from exc
    canonical = json.dumps(parsed.model_dump(mode="json"), sort_keys=True).encode()
    fingerprint = hashlib.sha256(request.url.path.encode() + b"\0" + canonical).hexdigest()
    return parsed, fingerprint
