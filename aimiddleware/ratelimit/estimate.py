"""What a request will use, before it runs (reservation) and after (reconciliation).

Input tokens are counted with the :class:`~aimiddleware.tokens.TokenCounter` for the
requested model; output tokens are the request's own cap (``max_tokens``,
``max_completion_tokens``, ``max_output_tokens``) or a configured estimate (per tier via
``Policy.output_estimate``, per model, or a default), none for an embeddings body; the
cost is priced with the :class:`~aimiddleware.pricing.PriceTable`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aimiddleware._messages import embeddings_input
from aimiddleware.context import RequestContext
from aimiddleware.errors import InvalidRequest
from aimiddleware.pricing import ModelPrice, PriceTable
from aimiddleware.ratelimit.policy import COST_SCALE, Policy
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.models import Usage

__all__ = ["OUTPUT_CAP_FIELDS", "Estimate", "Estimator"]

logger = logging.getLogger("aimiddleware.ratelimit")

OUTPUT_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_UNSET: Any = object()
# The last path segment of a route serving embeddings: OpenAI's /v1/embeddings (vLLM,
# LiteLLM, Ollama's OpenAI API alike), Ollama's own /api/embed.
_EMBEDDINGS_ROUTES = frozenset(("embeddings", "embed"))


def _as_routed(body: dict[str, Any], path: str) -> dict[str, Any]:
    """``body`` (whose ``input`` is a string) as its route reads it.

    On an embeddings route a bare-string ``input`` is one text to embed, which the body
    alone does not say (a Responses body has the same shape, so the token count takes it
    for one): it becomes the one-item list it means, which the count and the output
    estimate read as embeddings (a list of strings is no Responses input)."""
    if "messages" not in body and path.rstrip("/").rpartition("/")[2] in _EMBEDDINGS_ROUTES:
        return {**body, "input": [body["input"]]}
    return body


class Estimate:
    """What a request uses: tokens, and cost in integer nano-units (``COST_SCALE``) of the
    price table's currency (``None``: unpriced). ``cost`` is the same as a Decimal."""

    __slots__ = ("cost_units", "input_tokens", "model", "output_tokens", "requests")

    def __init__(
        self,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        cost: Decimal | None = None,
        requests: int = 1,
        *,
        cost_units: int | None = None,
    ) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.requests = requests
        if cost is not None:
            cost_units = math.ceil(cost * COST_SCALE) if cost else 0
        self.cost_units = cost_units

    @property
    def cost(self) -> Decimal | None:
        return None if self.cost_units is None else Decimal(self.cost_units) / COST_SCALE

    def __repr__(self) -> str:
        return (
            f"Estimate(model={self.model!r}, input_tokens={self.input_tokens}, "
            f"output_tokens={self.output_tokens}, cost_units={self.cost_units}, "
            f"requests={self.requests})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Estimate):
            return NotImplemented
        return self._tuple() == other._tuple()

    def __hash__(self) -> int:
        return hash(self._tuple())

    def _tuple(self) -> tuple[Any, ...]:
        return (self.model, self.input_tokens, self.output_tokens, self.cost_units, self.requests)

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
            return self.cost_units or 0
        raise ValueError(f"unknown dimension {dimension!r}")


_new_object = object.__new__


class _IntPrice:
    """A ModelPrice as integers: cost in nano-units = ceil(sum(tokens * rate) / den), exact
    (the rates of :meth:`ModelPrice.nano_rates`)."""

    __slots__ = ("cache_creation", "cached_input", "den", "input", "output", "price", "reasoning")

    def __init__(self, price: ModelPrice) -> None:
        self.price = price
        self.den, rates = price.nano_rates()
        self.input, self.cached_input, self.cache_creation, self.output, self.reasoning = rates

    def plain(self, input_tokens: int, output_tokens: int) -> int:
        """The cost of plain input and output tokens, rounded up."""
        return -(-(input_tokens * self.input + output_tokens * self.output) // self.den)

    def usage(self, usage: Usage) -> int:
        """``ceil(ModelPrice.cost(usage) * COST_SCALE)``, on integers."""
        cached = usage.cached_input_tokens
        created = usage.cache_creation_input_tokens
        plain_in = max(usage.input_tokens - cached - created, 0)
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        plain_out = usage.output_tokens - reasoning
        total = (
            plain_in * self.input
            + cached * self.cached_input
            + created * self.cache_creation
            + plain_out * self.output
            + reasoning * self.reasoning
        )
        return -(-total // self.den)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in (b"application/json", b"") or media.endswith(b"+json")


def _model_estimate(policy: Policy, model: str | None) -> int | None:
    """The ``output_estimate`` of ``policy``'s per-model policy for ``model``, if it sets one."""
    sub = policy.models.get(model) if policy.models and model is not None else None
    return None if sub is None else sub.output_estimate


def _output_estimate(policies: tuple[Policy, ...], model: str | None) -> int | None:
    """The ``output_estimate`` of the most specific of ``policies`` (most specific first)
    that sets one: a policy's per-model policy before the policy itself."""
    for pol in policies:
        found = _model_estimate(pol, model)
        if found is None:
            found = pol.output_estimate
        if found is not None:
            return found
    return None


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
        self._int_prices: dict[str, _IntPrice] = {}
        self._warm: set[str | None] = set()  # models whose vocabulary the counter holds
        self._offload = -1
        self._json_types: dict[bytes | None, bool] = {}  # content-type -> is JSON (bounded)

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
        specific: tuple[Policy, ...] = (),
    ) -> Estimate:
        found = self.estimate_now(ctx, policy, needs_body, needs_cost, content_type, specific)
        if found is not None:
            return found
        # The body must be counted off the event loop (or its model's vocabulary loaded).
        body = self._body(ctx, content_type)
        if type(body.get("input")) is str:
            body = _as_routed(body, ctx.path)
        model = ctx.model
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        served = ctx.model_version or model
        input_tokens = await self._count(ctx, body, served)
        return self._complete(body, policy, model, served, input_tokens, needs_cost, specific)

    def estimate_now(
        self,
        ctx: RequestContext,
        policy: Policy,
        needs_body: bool,
        needs_cost: bool,
        content_type: bytes | None = None,
        specific: tuple[Policy, ...] = (),
    ) -> Estimate | None:
        """:meth:`estimate` when it needs no ``await`` (the common case), else ``None``.

        ``policy``: the caller's (its tier's); ``specific``: the other policies that apply
        (the route's), most specific first, whose ``output_estimate`` comes before its.

        Runs on every request: written flat (no helper calls on the common path)."""
        if not needs_body:
            return Estimate(ctx.model, 0, 0)
        raw = ctx.body
        if not raw or raw.isspace():  # no body, no model call to reserve for (GET /health...)
            return Estimate(ctx.model, 0, 0, None, cost_units=0 if needs_cost else None)
        is_json = self._json_types.get(content_type)
        if is_json is None:
            is_json = self._learn_json(content_type)
        body = ctx.json() if is_json else None
        if not isinstance(body, dict):
            if is_json:
                body = self._body(ctx, content_type)  # raises InvalidRequest
            return None  # not JSON: estimated from the body size by estimate()
        if type(body.get("input")) is str:  # (an embeddings route's bare string?)
            body = _as_routed(body, ctx.path)
        model = ctx.model
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
        # Count and price the snapshot actually served when versioning resolved one.
        served = ctx.model_version or model
        # Count on the event loop only when that cannot block: the model's vocabulary is
        # loaded (an earlier async count for it finished) and the body is below the counter's
        # offload threshold (a JSON body has at least one byte per character of its strings,
        # so its length bounds what ``acount_request`` measures). Else estimate() counts.
        if served not in self._warm or not body or len(raw) > self._offload:
            return None
        try:
            input_tokens = int(self._counter.count_request(body, served).tokens)
        except Exception:  # a malformed shape is the endpoint's to reject, not ours
            logger.debug("token counting failed; estimating from the body size", exc_info=True)
            input_tokens = (len(raw) + 3) // 4
        # The first of OUTPUT_CAP_FIELDS that holds a count (_complete, for the common case).
        output = body.get("max_tokens")
        if type(output) is not int or output < 0:
            return self._complete(
                body, policy, model, served, input_tokens, needs_cost, specific
            )
        cost = None
        if needs_cost:
            # The price table never changes, so a model's integer price, once built, holds.
            fast = self._int_prices.get(served) if served is not None else None
            if fast is not None:  # fast.plain(), inlined
                cost = -(-(input_tokens * fast.input + output * fast.output) // fast.den)
            else:
                cost = self.price_units(served, input_tokens, output)
        # Estimate(model, input_tokens, output, cost_units=cost) without the class call (a
        # Python __init__ class call is not specialized on Python 3.11: ~2x the cost)
        found: Estimate = _new_object(Estimate)
        found.model = model
        found.input_tokens = input_tokens
        found.output_tokens = output
        found.requests = 1
        found.cost_units = cost
        return found

    def _learn_json(self, content_type: bytes | None) -> bool:
        is_json = _is_json(content_type)
        if len(self._json_types) < 64:  # bounded: content types come from requests
            self._json_types[content_type] = is_json
        return is_json

    def _body(self, ctx: RequestContext, content_type: bytes | None) -> dict[str, Any]:
        """The JSON object body ({} for a body that is not JSON); InvalidRequest if not one."""
        is_json = self._json_types.get(content_type)
        if is_json is None:
            is_json = self._learn_json(content_type)
        if not is_json:
            return {}
        body = ctx.json()
        if not isinstance(body, dict):
            raise InvalidRequest(
                "The request body must be a JSON object."
                if body is not None
                else "The request body is not valid JSON."
            )
        return body

    def _complete(
        self,
        body: Mapping[str, Any],
        policy: Policy,
        model: str | None,
        served: str | None,
        input_tokens: int,
        needs_cost: bool,
        specific: tuple[Policy, ...] = (),
    ) -> Estimate:
        output = None
        for name in OUTPUT_CAP_FIELDS:
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                output = value
                break
        if output is None:
            # A route's or a model's own estimate first, even for an embeddings body: that
            # rule reads the body alone, which a client writes (a Responses body with an
            # encoding_format beside its input is one to it)
            if specific:
                output = _output_estimate(specific, model)
            if output is None and policy.models:
                output = _model_estimate(policy, model)
            if output is None:
                if "input" in body and embeddings_input(body) is not None:
                    output = 0  # an embeddings request generates no tokens
                elif policy.output_estimate is not None:
                    output = policy.output_estimate
                else:
                    output = self.default_output(model)
        cost = self.price_units(served, input_tokens, output) if needs_cost else None
        return Estimate(model, input_tokens, output, None, cost_units=cost)

    async def _count(self, ctx: RequestContext, body: Mapping[str, Any], model: str | None) -> int:
        counter = self.counter
        if counter is not None and body:
            try:
                counted = await counter.acount_request(body, model)
                threshold = getattr(counter, "offload_threshold", None)
                if (
                    isinstance(threshold, int)
                    and hasattr(counter, "count_request")
                    and len(self._warm) < 1024  # bounded: model names come from requests
                ):
                    self._offload = threshold
                    self._warm.add(model)
                return int(counted.tokens)
            except Exception:  # a malformed shape is the endpoint's to reject, not ours
                logger.debug("token counting failed; estimating from the body size", exc_info=True)
        return (len(ctx.body) + 3) // 4

    def _int_price(self, model: str) -> _IntPrice | None:
        """The integer form of ``model``'s price, cached (a ``PriceTable`` never changes)
        (``None``: unpriced, or a table that is not a plain ``PriceTable``)."""
        found = self._int_prices.get(model)
        if found is not None:
            return found
        prices = self._prices
        if type(prices) is not PriceTable:
            return None
        price = prices.price(model)
        if type(price) is not ModelPrice:
            return None
        if len(self._int_prices) >= 1024:  # bounded: model names come from requests
            self._int_prices.clear()
        found = self._int_prices[model] = _IntPrice(price)
        return found

    def price_units(self, model: str | None, input_tokens: int, output_tokens: int) -> int | None:
        """The cost of plain input/output tokens in nano-units, rounded up (None: unpriced)."""
        if self._prices is _UNSET or model is None:
            return None
        fast = self._int_price(model)
        if fast is not None:
            return fast.plain(input_tokens, output_tokens)
        cost = self.price(model, input_tokens, output_tokens)
        return None if cost is None else (math.ceil(cost * COST_SCALE) if cost else 0)

    def price(self, model: str | None, input_tokens: int, output_tokens: int) -> Decimal | None:
        prices = self.prices
        if prices is None or model is None:
            return None
        price = prices.price(model)
        if price is None:
            return None
        cost: Decimal = price.cost(Usage(input_tokens=input_tokens, output_tokens=output_tokens))
        return cost

    def actual_cost(self, reserved: Estimate, usage: Usage, model: str | None) -> int | None:
        """The real cost in nano-units (the reserved one when the model has no price)."""
        model = model or reserved.model
        cost = reserved.cost_units
        if cost is not None and model:
            fast = self._int_prices.get(model) or self._int_price(model)
            if fast is not None:
                return fast.usage(usage)
            prices = self.prices
            priced = prices.estimate(model, usage) if prices is not None else None
            if priced is not None:
                priced = Decimal(priced)
                return math.ceil(priced * COST_SCALE) if priced else 0
        return cost
