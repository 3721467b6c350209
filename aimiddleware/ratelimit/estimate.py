"""What a request will use, before it runs (reservation) and after (reconciliation).

Input tokens are counted with the :class:`~aimiddleware.tokens.TokenCounter` for the
requested model; output tokens are the request's own cap (``max_tokens``,
``max_completion_tokens``, ``max_output_tokens``) or a configured estimate (per tier via
``Policy.output_estimate``, per model, or a default); the cost is priced with the
:class:`~aimiddleware.pricing.PriceTable`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from aimiddleware.context import RequestContext
from aimiddleware.errors import InvalidRequest
from aimiddleware.ratelimit.policy import COST_SCALE, Policy
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.models import Usage

__all__ = ["OUTPUT_CAP_FIELDS", "Estimate", "Estimator"]

logger = logging.getLogger("aimiddleware.ratelimit")

OUTPUT_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_UNSET: Any = object()
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Estimate:
    model: str | None
    input_tokens: int
    output_tokens: int
    cost: Decimal | None
    requests: int = 1

    def units(self, dimension: str) -> int:
        if dimension == "requests":
            return self.requests
        if dimension == "tokens":
            return self.input_tokens + self.output_tokens
        if dimension == "input_tokens":
            return self.input_tokens
        if dimension == "output_tokens":
            return self.output_tokens
        if dimension == "cost":
            return math.ceil(self.cost * COST_SCALE) if self.cost else 0
        raise ValueError(f"unknown dimension {dimension!r}")

    def zero(self) -> Estimate:
        return replace(self, input_tokens=0, output_tokens=0, cost=Decimal(0), requests=0)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in (b"application/json", b"") or media.endswith(b"+json")


class Estimator:
    """``counter``: a TokenCounter (default: a new one); ``prices``: a PriceTable or None."""

    def __init__(self, counter: Any, prices: Any, output_estimate: int | Mapping[str, int]) -> None:
        if isinstance(output_estimate, int):
            if output_estimate < 0:
                raise ValueError("output_estimate must be >= 0")
        elif not isinstance(output_estimate, Mapping):
            raise TypeError("output_estimate must be an int or a {model: int} mapping")
        self._counter = counter if counter is not None else _UNSET
        self._prices = prices if prices is not None else _UNSET
        self.output_estimate = output_estimate

    @property
    def counter(self) -> Any:
        if self._counter is _UNSET:
            self._counter = TokenCounter()
        return self._counter

    @property
    def prices(self) -> Any:
        return None if self._prices is _UNSET else self._prices

    def default_output(self, model: str | None) -> int:
        if isinstance(self.output_estimate, int):
            return self.output_estimate
        if model is not None and model in self.output_estimate:
            return int(self.output_estimate[model])
        return int(self.output_estimate.get("*", 1024))

    async def estimate(
        self,
        ctx: RequestContext,
        policy: Policy,
        *,
        needs_body: bool,
        needs_cost: bool,
        content_type: bytes | None = None,
    ) -> Estimate:
        if not needs_body:
            return Estimate(ctx.model, 0, 0, None)
        if not ctx.body.strip():  # no body, no model call to reserve for (GET /health...)
            return Estimate(ctx.model, 0, 0, Decimal(0) if needs_cost else None)
        body: Any = None
        if _is_json(content_type):
            body = ctx.json()
            if not isinstance(body, dict):
                raise InvalidRequest(
                    "The request body must be a JSON object."
                    if body is not None
                    else "The request body is not valid JSON."
                )
        body = body or {}
        model = ctx.model
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        # Count and price the snapshot actually served when versioning resolved one.
        served = ctx.model_version or model
        input_tokens = await self._count(ctx, body, served)
        output = None
        for name in OUTPUT_CAP_FIELDS:
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                output = value
                break
        if output is None:
            if policy.output_estimate is not None:
                output = policy.output_estimate
            else:
                output = self.default_output(model)
        cost = None
        if needs_cost:
            cost = self.price(served, input_tokens, output)
        return Estimate(model, input_tokens, output, cost)

    async def _count(self, ctx: RequestContext, body: Mapping[str, Any], model: str | None) -> int:
        counter = self.counter
        if counter is not None and body:
            try:
                counted = await counter.acount_request(body, model)
                return int(counted.tokens)
            except Exception:  # a malformed shape is the endpoint's to reject, not ours
                logger.debug("token counting failed; estimating from the body size", exc_info=True)
        return (len(ctx.body) + 3) // 4

    def price(self, model: str | None, input_tokens: int, output_tokens: int) -> Decimal | None:
        prices = self.prices
        if prices is None or model is None:
            return None
        price = prices.price(model)
        if price is None:
            return None
        # What PriceTable.estimate computes for plain input/output, without a Usage object.
        total: Decimal = Decimal(input_tokens) * price.input + Decimal(output_tokens) * price.output
        return total / _MILLION

    def actual(self, reserved: Estimate, usage: Usage, model: str | None) -> Estimate:
        model = model or reserved.model
        cost: Decimal | None = reserved.cost
        if reserved.cost is not None:
            prices = self.prices
            priced = prices.estimate(model, usage) if prices is not None and model else None
            if priced is not None:
                cost = Decimal(priced)
        return Estimate(model, usage.input_tokens, usage.output_tokens, cost)
