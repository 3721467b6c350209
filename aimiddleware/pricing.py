"""``PriceTable``: what a call cost, in ``Decimal``, per model and alias.

Prices are per **million** tokens. Cached input tokens are billed at ``cached_input`` (the
input price when unset), cache writes at ``cache_creation`` (input price when unset), and
reasoning tokens, a subset of output, at ``reasoning`` (output price when unset). A model
the table does not know is *unpriced*: :meth:`PriceTable.estimate` returns ``None``, never 0.

Load from a dict, a JSON or TOML file, or LiteLLM's ``model_prices_and_context_window.json``
(per-token prices, converted exactly through ``Decimal(str(x))``).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

from aimiddleware.usage.models import Usage

__all__ = ["ModelPrice", "PriceTable", "Quote"]

MILLION = Decimal(1_000_000)
_RESOLVED_MAX = 4096  # distinct model names whose lookup a PriceTable remembers
_QUOTES_MAX = 1024  # distinct costs whose quote a ModelPrice remembers
_EXACT_MAX = 10**27  # below it, Decimal (28 digits) computes the cost exactly too
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
_FIELDS = ("input", "output", "cached_input", "cache_creation", "reasoning")
_LITELLM = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_creation",
    "output_cost_per_reasoning_token": "reasoning",
}


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool):
        raise TypeError(f"{what}: a price must be a number, not a bool")
    try:
        dec = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"{what}: not a number: {value!r}") from exc
    if not dec.is_finite() or dec < 0:
        raise ValueError(f"{what}: a price must be a finite number >= 0")
    return dec.copy_abs()  # (-0 is 0: else a free model's costs read "-0.0")


class Quote(NamedTuple):
    """A cost three ways: the ``Decimal``, its plain decimal string, whole 1e-9 units."""

    cost: Decimal
    text: str
    nanos: int


def _plain_text(digits: str, exp: int) -> str:
    """``format(Decimal(f"{digits}E{exp}"), "f")`` from the coefficient's digits."""
    if exp >= 0:
        return digits + "0" * exp if digits != "0" else "0"
    places = -exp
    if len(digits) <= places:
        digits = "0" * (places - len(digits) + 1) + digits
    return digits[:-places] + "." + digits[-places:]


_tuple = tuple.__new__  # Quote(...) without its Python-level __new__ (per request)


@dataclass(frozen=True)
class ModelPrice:
    """Prices per million tokens; ``None`` fields fall back as described in the module."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None
    cache_creation: Decimal | None = None
    # Exact integer pricing for quote(): (exponent, nanos factor or 0, scaled prices), and a
    # memo of quotes.
    _scaled: tuple[int, int, tuple[int, int, int, int, int]] = field(
        init=False, repr=False, compare=False
    )
    _quotes: dict[int, Quote] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None or name in ("input", "output"):
                object.__setattr__(self, name, _decimal(value, name))
        # The five rates cost() multiplies by, as integers at their smallest exponent: the
        # integer sum then is exactly the coefficient of cost()'s Decimal sum.
        rates = (
            self.input,
            self.cached_input if self.cached_input is not None else self.input,
            self.cache_creation if self.cache_creation is not None else self.input,
            self.output,
            self.reasoning if self.reasoning is not None else self.output,
        )
        exp = min(int(r.as_tuple().exponent) for r in rates)
        # (exactly: scaleb would round a coefficient beyond the context's 28 digits)
        scaled = tuple(
            int("".join(map(str, t.digits))) * 10 ** (int(t.exponent) - exp)
            for t in (r.as_tuple() for r in rates)
        )
        # n * 10**(exp+3) is the cost in nanos: a plain product unless exp < -3 (rounding)
        factor = int(10 ** (exp + 3)) if exp >= -3 else 0
        object.__setattr__(self, "_scaled", (exp, factor, scaled))
        object.__setattr__(self, "_quotes", {})

    @classmethod
    def coerce(cls, value: ModelPrice | Mapping[str, Any]) -> ModelPrice:
        if isinstance(value, ModelPrice):
            return value
        if not isinstance(value, Mapping):
            raise TypeError("a price must be a ModelPrice or a mapping")
        unknown = set(value) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown price fields: {sorted(unknown)}")
        if "input" not in value or "output" not in value:
            raise ValueError("a price needs 'input' and 'output' (per million tokens)")
        return cls(**{k: value[k] for k in _FIELDS if value.get(k) is not None})

    def nano_rates(self) -> tuple[int, tuple[int, int, int, int, int]]:
        """``(den, rates)``: the exact cost in nanos (1e-9 currency units) of token counts is
        ``sum(count * rate) / den``; rates for input, cached input, cache creation, output
        and reasoning tokens, in that order (the fallbacks of :meth:`cost` applied)."""
        exp, factor, scaled = self._scaled
        if factor:  # whole nanos per token at this exponent
            return 1, (
                scaled[0] * factor, scaled[1] * factor, scaled[2] * factor,
                scaled[3] * factor, scaled[4] * factor,
            )
        return int(10 ** -(exp + 3)), scaled

    def cost(self, usage: Usage) -> Decimal:
        """The cost of ``usage`` (cached and cache-creation tokens are subsets of input)."""
        cached = usage.cached_input_tokens
        created = usage.cache_creation_input_tokens
        plain_in = max(usage.input_tokens - cached - created, 0)
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        plain_out = usage.output_tokens - reasoning
        total = (
            plain_in * self.input
            + cached * (self.cached_input if self.cached_input is not None else self.input)
            + created * (self.cache_creation if self.cache_creation is not None else self.input)
            + plain_out * self.output
            + reasoning * (self.reasoning if self.reasoning is not None else self.output)
        )
        return total / MILLION

    def quote(self, usage: Usage) -> Quote:
        """:meth:`cost` with its decimal string and nanos, in integer arithmetic (per request).

        The same ``Decimal`` as :meth:`cost` (value and exponent): the sum of the products is
        the integer ``n`` at the smallest rate exponent ``e``, and dividing by a million
        exactly gives ``n * 10**(e-6)`` with up to six trailing zeros of ``n`` moved into the
        exponent (Decimal's ideal exponent for an exact quotient is ``e``).
        """
        cached = usage.cached_input_tokens
        created = usage.cache_creation_input_tokens
        out = usage.output_tokens
        reasoning = usage.reasoning_tokens
        if reasoning > out:
            reasoning = out
        plain_in = usage.input_tokens - cached - created
        if plain_in < 0:
            plain_in = 0
        exp, factor, (p_in, p_cached, p_created, p_out, p_reasoning) = self._scaled
        n = (
            plain_in * p_in + cached * p_cached + created * p_created
            + (out - reasoning) * p_out + reasoning * p_reasoning
        )
        quotes = self._quotes
        found = quotes.get(n)  # the same n always gives the same quote (exp is fixed)
        if found is not None:
            return found
        if n >= _EXACT_MAX:  # beyond 28 digits Decimal rounds: let it
            cost = self.cost(usage)
            found = Quote(cost, format(cost, "f"), int((cost * _NANOS).to_integral_value()))
        else:
            digits = str(n)
            if n:
                coef = digits.rstrip("0")
                shift = len(digits) - len(coef)
                if shift > 6:
                    coef, shift = digits[:-6], 6
            else:
                coef, shift = digits, 6  # zero: the ideal exponent
            at = exp - 6 + shift  # cost == coef * 10**at
            found = _tuple(Quote, (
                Decimal(f"{coef}E{at}"),
                _plain_text(coef, at),
                n * factor if factor else _nanos(n, exp + 3),
            ))
        if len(quotes) >= _QUOTES_MAX:
            quotes.clear()
        quotes[n] = found
        return found


_NANOS = Decimal(1_000_000_000)


def _nanos(n: int, exp: int) -> int:
    """``n * 10**exp`` rounded half to even (what ``Decimal.to_integral_value`` does)."""
    if exp >= 0:
        return n * int(10**exp)
    unit = int(10**-exp)
    q, r = divmod(n, unit)
    half = unit // 2
    return q + 1 if r > half or (r == half and q % 2) else q


class PriceTable:
    """Model name (or alias) -> :class:`ModelPrice`.

    Lookup: the exact name, then ``aliases``, then the name without a ``provider/`` prefix,
    then without a trailing snapshot date (``gpt-4o-2024-08-06`` -> ``gpt-4o``) when the
    dated name itself is not listed.
    """

    def __init__(
        self,
        prices: Mapping[str, ModelPrice | Mapping[str, Any]],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(prices, Mapping):
            raise TypeError("prices must be a mapping of model -> price")
        self._prices = {str(m): ModelPrice.coerce(p) for m, p in prices.items()}
        self._aliases = dict(aliases or {})
        for alias, target in self._aliases.items():
            if target not in self._prices:
                raise ValueError(f"alias {alias!r} points at unpriced model {target!r}")
        # name -> its price (or None): the table never changes, so a lookup is done once.
        self._resolved: dict[str, ModelPrice | None] = {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriceTable:
        """``{"prices": {...}, "aliases": {...}}`` or a flat ``{model: price}`` mapping."""
        if "prices" in data and isinstance(data["prices"], Mapping):
            return cls(data["prices"], data.get("aliases"))
        return cls(data)

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """A JSON or TOML file (by suffix ``.toml``; anything else is read as JSON)."""
        path = Path(path)
        if path.suffix.lower() == ".toml":
            with path.open("rb") as f:
                return cls.from_dict(tomllib.load(f))
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_litellm(cls, source: str | Path | Mapping[str, Any]) -> PriceTable:
        """LiteLLM's ``model_prices_and_context_window.json`` (prices per token).

        Entries without both an input and an output per-token price (image, audio or
        per-request pricing, ``sample_spec``) are skipped.
        """
        if isinstance(source, str | Path):
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        else:
            data = source
        prices: dict[str, ModelPrice] = {}
        for model, entry in data.items():
            if model == "sample_spec" or not isinstance(entry, Mapping):
                continue
            fields: dict[str, Decimal] = {}
            for key, name in _LITELLM.items():
                value = entry.get(key)
                if isinstance(value, int | float | str) and not isinstance(value, bool):
                    try:
                        fields[name] = _decimal(value, f"{model}.{key}") * MILLION
                    except ValueError:
                        continue
            if "input" in fields and "output" in fields:
                prices[model] = ModelPrice(**{k: v.normalize() for k, v in fields.items()})
        return cls(prices)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.price(model) is not None

    def __len__(self) -> int:
        return len(self._prices)

    def price(self, model: str | None) -> ModelPrice | None:
        if not model:
            return None
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found = self._lookup(model)
        if len(self._resolved) >= _RESOLVED_MAX:
            self._resolved.clear()
        self._resolved[model] = found
        return found

    def _lookup(self, model: str) -> ModelPrice | None:
        for name in self._candidates(model):
            if name in self._prices:
                return self._prices[name]
            target = self._aliases.get(name)
            if target is not None:
                return self._prices[target]
        return None

    @staticmethod
    def _candidates(model: str) -> list[str]:
        names = [model]
        if "/" in model:
            names.append(model.split("/", 1)[1])
        for name in list(names):
            undated = _DATE_SUFFIX.sub("", name)
            if undated != name:
                names.append(undated)
        return names

    def estimate(self, model: str | None, usage: Usage) -> Decimal | None:
        """Cost of ``usage`` on ``model`` in the table's currency; ``None`` if unpriced."""
        price = self.price(model)
        return None if price is None else price.cost(usage)
