"""Mountable usage routes: history, token counting, feedback; always scoped to the caller.

``UsageRoutes(...).routes`` is a list of Starlette ``Route`` objects: add them to a Starlette
app (``routes=[*usage.routes]``), to a FastAPI app (``app.router.routes.extend(usage.routes)``)
or mount ``usage.router`` under a prefix. Endpoints (paths relative to where they are mounted):

- ``GET /usage?start=YYYY-MM-DD&end=YYYY-MM-DD&model=...``: the caller's usage by day and model
- ``GET /usage/requests/{request_id}``: one of the caller's requests, with its feedback
- ``POST /count_tokens`` (path configurable): a chat/messages/responses-shaped body ->
  ``{"input_tokens", "exact", "encoding", "model", "estimated_cost"}`` (input-side cost)
- ``POST /feedback``: ``{"request_id", "rating" (-1..5), "comment"?, "labels"?}``; 201, or 404
  when the request id is unknown *to this caller* (someone else's is indistinguishable)

The caller is ``ctx.principal`` from the context layer (else the default principal rule).
Errors render as the package's problem+json even without the error layer.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import date
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from aimiddleware._problem import shown
from aimiddleware.context import SCOPE_KEY, RequestContext, current_or_none, default_principal
from aimiddleware.errors import AIError, InvalidRequest, NotFound, ValidationFailed, render_problem
from aimiddleware.pricing import PriceTable
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.ledger import Ledger
from aimiddleware.usage.models import Usage
from aimiddleware.usage.openapi import openapi_paths
from aimiddleware.usage.records import Feedback

__all__ = ["UsageRoutes"]

Endpoint = Callable[[Request], Awaitable[Response]]


def _ctx(request: Request) -> RequestContext | None:
    ctx = request.scope.get("state", {}).get(SCOPE_KEY)
    return ctx if isinstance(ctx, RequestContext) else None


def _principal(request: Request) -> str:
    ctx = _ctx(request)
    return ctx.principal if ctx is not None else default_principal(request.scope)


def _date(value: str | None, param: str) -> date | None:
    if value is None or value == "":
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{param} must be a date (YYYY-MM-DD).", param=param) from None


def _dump(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_dump, separators=(",", ":")).encode()


class UsageRoutes:
    """The routes over one ledger, counter and price table (``None``: the usage layer's)."""

    def __init__(
        self,
        *,
        ledger: Ledger | None = None,
        counter: TokenCounter | None = None,
        prices: PriceTable | None = None,
        usage_path: str = "/usage",
        count_tokens_path: str = "/count_tokens",
        feedback_path: str = "/feedback",
    ) -> None:
        for path in (usage_path, count_tokens_path, feedback_path):
            if not path.startswith("/"):
                raise ValueError("route paths must start with '/'")
        self.ledger = ledger
        self.counter = counter
        self.prices = prices
        self.paths = (usage_path, count_tokens_path, feedback_path)
        self.routes = [
            Route(usage_path, self._wrap(self.usage), methods=["GET"]),
            Route(usage_path.rstrip("/") + "/requests/{request_id}", self._wrap(self.request),
                  methods=["GET"]),
            Route(count_tokens_path, self._wrap(self.count_tokens), methods=["POST"]),
            Route(feedback_path, self._wrap(self.feedback), methods=["POST"]),
        ]
        self.router = Router(routes=self.routes)

    def openapi_paths(self, prefix: str = "") -> dict[str, Any]:
        """These routes' OpenAPI path items and the component schemas they use (pure).

        ``prefix``: where they are mounted (``""`` when added to the app's own routes).
        Merge into a FastAPI app's document with :func:`aimiddleware.openapi.add_paths`.
        """
        return openapi_paths(*(prefix + p for p in self.paths))

    def _wrap(self, fn: Endpoint) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except AIError as err:
                ctx = _ctx(request)
                status, headers, body = render_problem(
                    err, request_id=ctx.request_id if ctx else None
                )
                response = Response(body, status_code=status)
                response.raw_headers = list(headers)  # content-type and length included
                return response

        endpoint.__name__ = fn.__name__
        return endpoint

    def _settings(self, request: Request) -> Any:
        ctx = _ctx(request)
        return ctx.state.get("usage") if ctx is not None else None

    def _ledger(self, request: Request) -> Ledger:
        ledger = self.ledger or getattr(self._settings(request), "ledger", None)
        if ledger is None:
            raise NotFound("Usage history is not enabled.")
        return ledger

    async def _json_body(self, request: Request) -> Any:
        ctx = _ctx(request)
        if ctx is not None:
            parsed = ctx.json()  # parsed once per request (the usage layer read it already)
            if isinstance(parsed, dict):
                return dict(parsed)  # a copy: feedback edits it, other layers share ctx.json()
        raw = ctx.body if ctx is not None else await request.body()
        try:  # not an object: json.loads says why
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep too
            raise InvalidRequest("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        return data

    async def usage(self, request: Request) -> Response:
        q = request.query_params
        start, end = _date(q.get("start"), "start"), _date(q.get("end"), "end")
        if start and end and start > end:
            raise InvalidRequest("start must not be after end.", param="start")
        rows = await self._ledger(request).query(
            _principal(request), start=start, end=end, model=q.get("model") or None
        )
        total = Usage(
            input_tokens=sum(r.input_tokens for r in rows),
            output_tokens=sum(r.output_tokens for r in rows),
            cached_input_tokens=sum(r.cached_input_tokens for r in rows),
            cache_creation_input_tokens=sum(r.cache_creation_input_tokens for r in rows),
            reasoning_tokens=sum(r.reasoning_tokens for r in rows),
        )
        return _JSON({
            "object": "list",
            "data": [r.model_dump() for r in rows],
            "totals": {
                "requests": sum(r.requests for r in rows),
                **total.model_dump(),
                "estimated_cost": sum((r.estimated_cost for r in rows), Decimal(0)),
                "unpriced_requests": sum(r.unpriced_requests for r in rows),
            },
        })

    async def request(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        found = await self._ledger(request).get_request(_principal(request), request_id)
        if found is None:
            raise NotFound("No such request in your usage history.", param="request_id")
        data = found.model_dump()
        data["record"].pop("principal", None)
        data["record"].pop("record_id", None)
        return _JSON(data)

    async def count_tokens(self, request: Request) -> Response:
        body = await self._json_body(request)
        settings = self._settings(request)
        counter = self.counter or getattr(settings, "counter", None) or TokenCounter()
        prices = self.prices or getattr(settings, "prices", None)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        ctx = current_or_none()
        # The snapshot versioning resolved the name to, when it did: that is what is priced.
        served = (ctx.model_version if ctx is not None else None) or model
        try:
            count = await counter.acount_request(body, served)
        except TypeError as exc:
            raise InvalidRequest(f"Unsupported request shape: {exc}") from None
        cost = None
        if prices is not None and served is not None:
            cost = prices.estimate(served, Usage(input_tokens=count.tokens))
        return _JSON({
            "object": "token_count",
            "model": model,
            "input_tokens": count.tokens,
            "exact": count.exact,
            "encoding": count.encoding,
            "estimated_cost": cost,
        })

    async def feedback(self, request: Request) -> Response:
        body = await self._json_body(request)
        body.pop("created", None)
        try:
            fb = Feedback.model_validate(body)
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            param = shown(".".join(str(p) for p in first["loc"])) or None  # (a key sent)
            raise ValidationFailed(f"Invalid feedback: {first['msg']}", param=param) from None
        if not await self._ledger(request).add_feedback(_principal(request), fb):
            raise NotFound("No such request in your usage history.", param="request_id")
        return _JSON({"object": "feedback", "request_id": fb.request_id, "recorded": True},
                     status_code=201)
