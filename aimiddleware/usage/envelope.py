"""``@envelope``: an endpoint returns a completion, the client gets an :class:`Envelope`.

The endpoint returns a :class:`Completion` (text plus usage plus raw finish reason), a
mapping of the same keys, or an OpenAI Chat / Anthropic Messages response (dict or SDK
object). The decorator fills in id, model as requested, served ``model_version``, the
normalized and raw finish reason, usage, estimated cost (from the usage layer's price
table), duration, request id and the request's sampling parameters; it also reports the usage
to the stack so the usage layer records it without parsing the body.

With ``schema=SomeModel`` the raw output is validated: ``parsed`` on success, otherwise
``parsing_error`` beside the untouched output (never repaired or truncated).
"""

from __future__ import annotations

import functools
import inspect
import secrets
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from aimiddleware.context import RequestContext, current_or_none
from aimiddleware.finish_reason import normalize_finish_reason
from aimiddleware.pricing import PriceTable
from aimiddleware.usage.extract import from_response
from aimiddleware.usage.models import Envelope, Usage, believed, sampling_params

__all__ = ["Completion", "build_envelope", "envelope"]

F = TypeVar("F", bound=Callable[..., Any])


class Completion(BaseModel):
    """What a model call produced, before it is wrapped."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, protected_namespaces=())

    output: Any = None
    usage: Usage | None = None
    finish_reason: str | None = None
    model_version: str | None = None
    provider: str | None = None
    parsed: Any = None
    parsing_error: str | None = None
    confidence: float | None = None
    system_fingerprint: str | None = None


def _text_of(body: Mapping[str, Any]) -> Any:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message")
        if isinstance(message, Mapping):
            return message.get("content")
        return choices[0].get("text")
    content = body.get("content")
    if isinstance(content, list):  # Anthropic content blocks
        return "".join(b.get("text", "") for b in content if isinstance(b, Mapping))
    return body.get("output", body.get("output_text"))


def as_completion(value: Any) -> Completion:
    """Coerce what an endpoint returned into a :class:`Completion`."""
    if isinstance(value, Completion):
        return value
    if hasattr(value, "model_dump") and not isinstance(value, Mapping):
        value = value.model_dump()
    if isinstance(value, str):
        return Completion(output=value)
    if not isinstance(value, Mapping):
        raise TypeError("an @envelope endpoint must return a Completion, a mapping or a str")
    if set(value) <= set(Completion.model_fields):
        data = dict(value)
        if isinstance(data.get("usage"), Mapping):
            data["usage"] = Usage.from_any(data["usage"])
        return Completion.model_validate(data)
    found = from_response(value)
    return Completion(
        output=_text_of(value),
        usage=found.usage if found else None,
        finish_reason=found.raw_finish_reason if found else None,
        model_version=found.model_version if found else None,
        provider=found.provider if found else None,
        system_fingerprint=value.get("system_fingerprint"),
    )


def _validate(schema: type[BaseModel], output: Any) -> tuple[Any, str | None]:
    try:
        if isinstance(output, str | bytes):
            model = schema.model_validate_json(output)
        else:
            model = schema.model_validate(output)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        return None, "; ".join(problems[:10])
    return model.model_dump(mode="json"), None


def build_envelope(
    value: Any,
    ctx: RequestContext | None = None,
    *,
    prices: PriceTable | None = None,
    schema: type[BaseModel] | None = None,
    id_prefix: str = "env_",
) -> Envelope:
    """The envelope for ``value``; with ``ctx``, usage is also reported to the stack."""
    comp = as_completion(value)
    if comp.usage is not None:  # (the app's own Usage: a count past MAX_TOKENS is junk)
        comp = comp.model_copy(update={"usage": believed(comp.usage)})
    parsed, error = comp.parsed, comp.parsing_error
    if schema is not None and parsed is None and error is None:
        parsed, error = _validate(schema, comp.output)
    model = ctx.model if ctx is not None else None
    body = ctx.json() if ctx is not None else None
    if model is None and isinstance(body, Mapping) and isinstance(body.get("model"), str):
        model = body["model"]
    version = comp.model_version or (ctx.model_version if ctx is not None else None)
    if prices is None and ctx is not None:
        settings = ctx.state.get("usage")
        prices = getattr(settings, "prices", None)
    cost: Decimal | None = None
    if comp.usage is not None and prices is not None:
        # the served snapshot's price, else the requested name's (as UsageAccounting.settle)
        price = prices.price(version) or prices.price(model)
        if price is not None:
            cost = price.cost(comp.usage)
    reason = (
        normalize_finish_reason(comp.finish_reason, comp.provider)
        if comp.finish_reason is not None
        else None
    )
    if ctx is not None:
        if comp.usage is not None:
            ctx.usage = comp.usage
            ctx.state["usage_reported"] = True
        ctx.raw_finish_reason = comp.finish_reason or ctx.raw_finish_reason
        ctx.model_version = version
        ctx.model = ctx.model or model
        if cost is not None:
            ctx.estimated_cost = cost
        if comp.provider:
            ctx.state["usage_provider"] = comp.provider
    return Envelope(
        id=id_prefix + secrets.token_hex(12),
        model=model,
        model_version=version,
        output=comp.output,
        finish_reason=reason,
        raw_finish_reason=comp.finish_reason,
        usage=comp.usage,
        estimated_cost=cost,
        request_duration_ms=round(ctx.elapsed_ms, 3) if ctx is not None else None,
        request_id=ctx.request_id if ctx is not None else None,
        confidence=comp.confidence,
        parsed=parsed,
        parsing_error=error,
        sampling=sampling_params(body),
        system_fingerprint=comp.system_fingerprint,
    )


def envelope(
    func: F | None = None,
    *,
    schema: type[BaseModel] | None = None,
    prices: PriceTable | None = None,
    response: bool = False,
) -> Any:
    """Decorate an endpoint (sync or async, any signature) so it returns an :class:`Envelope`.

    ``response=True`` returns a ``JSONResponse`` (plain Starlette endpoints); by default the
    Envelope itself is returned and FastAPI serializes it (its response model is Envelope).
    """

    def decorate(fn: F) -> F:
        is_async = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if is_async:
                value = await fn(*args, **kwargs)
            else:
                value = await run_in_threadpool(fn, *args, **kwargs)
            env = build_envelope(value, current_or_none(), prices=prices, schema=schema)
            if response:
                return JSONResponse(env.model_dump(mode="json"))
            return env

        sig = inspect.signature(fn, eval_str=True)
        wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
            return_annotation=JSONResponse if response else Envelope
        )
        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate
