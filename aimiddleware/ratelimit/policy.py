"""Rate-limit policies: which limits apply to a request, on which dimensions and windows.

A :class:`Policy` is a set of :class:`Limit` objects written as ``limits``-style strings
(``"60/minute"``, ``"5/second;1000/day"``, parsed with :func:`limits.parse_many`) on the
dimensions ``requests``, ``tokens`` (input + output), ``input_tokens``, ``output_tokens``,
``cost`` (money, priced by the PriceTable; amounts may be decimal: ``"2.50/day"``) and
``concurrency`` (requests in flight at once). A policy may carry per-model policies
(``models={"gpt-4o": Policy(tokens="30000/minute")}``) whose limits apply only to requests
for that model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import Literal

from limits import parse_many

from aimiddleware.headers import sf_string

__all__ = [
    "COST_SCALE",
    "DIMENSIONS",
    "Dimension",
    "Limit",
    "Policy",
    "check_header_names",
    "parse_limits",
]

Dimension = Literal["requests", "tokens", "input_tokens", "output_tokens", "cost"]
DIMENSIONS: tuple[Dimension, ...] = ("requests", "tokens", "input_tokens", "output_tokens", "cost")

#: Money is counted in integer nano-units of the price table's currency.
COST_SCALE = Decimal(1_000_000_000)

_AMOUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(/|per\b)", re.IGNORECASE)
_MAX_WINDOW = 86_400 * 366
_NAME_CUT = 48  # (characters of a scope's value kept in a limit's name)


@dataclass(frozen=True)
class Limit:
    """``amount`` units of ``dimension`` per ``window`` seconds, within ``scope``.

    ``amount`` is an integer in the dimension's unit (cost: nano-units, see ``COST_SCALE``).
    ``scope`` is ``""`` for the principal's global limits, ``"model:<name>"`` or
    ``"route:<name>"`` for scoped ones (``"route:<name>|model:<name>"`` for a route
    policy's per-model limit); it is part of the storage field, the amount is not
    (so raising a principal's tier keeps what they already used in the window).
    """

    dimension: Dimension
    amount: int
    window: int
    scope: str = ""
    text: str = ""

    @cached_property
    def field(self) -> str:
        base = f"{self.dimension}:{self.window}"
        return f"{self.scope}|{base}" if self.scope else base

    @property
    def window_name(self) -> str:
        return window_label(self.window)

    @cached_property
    def name(self) -> str:
        """A short, header-safe name: ``tokens-1m``, ``model-gpt-4o-tokens-1m``."""
        base = f"{self.dimension.replace('_', '-')}-{self.window_name}"
        if not self.scope:
            return base
        kind, _, value = self.scope.partition(":")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", value)
        if len(safe) > _NAME_CUT:  # (long model ids share prefixes: the cut keeps a digest)
            digest = hashlib.sha256(value.encode()).hexdigest()[:7]
            safe = f"{safe[:_NAME_CUT - 8]}-{digest}"
        return f"{kind}-{safe}-{base}"

    @cached_property
    def policy_item(self) -> str:
        """This limit as a member of the IETF ``RateLimit-Policy`` list."""
        unit = ';qu="requests"' if self.dimension == "requests" else ""
        return f"{sf_string(self.name)};q={self.amount}{unit};w={self.window}"

    @property
    def display_amount(self) -> str:
        if self.dimension == "cost":
            return format((Decimal(self.amount) / COST_SCALE).normalize(), "f")
        return str(self.amount)

    def scoped(self, scope: str) -> Limit:
        return Limit(self.dimension, self.amount, self.window, scope, self.text)


def check_header_names(option: str, scoped: Iterable[tuple[str, Iterable[Limit]]]) -> None:
    """Refuse two of ``option``'s values (model names, route paths) whose limits would carry
    the same name in the headers (``RateLimit-Policy``, ``RateLimit``) and in a refusal's
    ``violated-policies``: ``Limit.name`` keeps a scope's letters, digits, ``.``, ``_`` and
    ``-`` and makes each other character ``_``, so ``a/b`` and ``a:b`` (or ``/v1/a/b`` and
    ``/v1/a_b``) are one name. Their counters stay apart (the storage field keeps the value
    as given), but a client could not tell which limit a header or a refusal means.
    ``scoped``: each value with its limits, already scoped."""
    seen: dict[str, str] = {}
    for value, limits in scoped:
        for lim in limits:
            first = seen.setdefault(lim.name, value)
            if first != value:
                raise ValueError(
                    f"{option} {first!r} and {value!r} would both name their limits "
                    f"{lim.name!r} in the rate-limit headers (a name keeps letters, digits, "
                    "'.', '_' and '-'; each other character becomes '_'): a client could not "
                    "tell them apart"
                )


def window_label(seconds: int) -> str:
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_limits(dimension: Dimension, spec: str | Iterable[str]) -> tuple[Limit, ...]:
    """Parse ``"60/minute;1000/day"`` (or a list of such strings) for one dimension."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    texts = _texts(dimension, spec)
    out: list[Limit] = []
    for text in texts:
        for part in re.split(r"[,;|]", text):
            if part.strip():
                out.append(_parse_one(dimension, part.strip()))
    if not out:
        raise ValueError(f"no limit in {spec!r} for {dimension}")
    windows = [lim.window for lim in out]
    if len(set(windows)) != len(windows):
        raise ValueError(f"two {dimension} limits share a window in {spec!r}")
    return tuple(out)


def _texts(dimension: Dimension, spec: object) -> tuple[str, ...]:
    """``spec`` as limit strings; a TypeError naming the option for anything else (a number
    was iterated, and failed with "'int' object is not iterable")."""
    if isinstance(spec, str):
        return (spec,)
    texts = tuple(spec) if isinstance(spec, Iterable) and not isinstance(spec, bytes) else None
    if texts is None or not all(isinstance(text, str) for text in texts):
        example = "'2.50/day'" if dimension == "cost" else "'60/minute'"
        raise TypeError(
            f"{dimension} takes a limit string such as {example} (or a list of them), "
            f"got {spec!r}"
        )
    return texts


def _parse_one(dimension: Dimension, text: str) -> Limit:
    m = _AMOUNT.match(text)
    if m is None:
        raise ValueError(f"invalid limit {text!r}: expected e.g. '60/minute'")
    try:
        amount = Decimal(m.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"invalid amount in {text!r}") from exc
    # limits parses the window; the amount is re-read so that cost may be fractional.
    try:
        (item,) = parse_many("1" + text[m.end(1) :])
    except ValueError as exc:
        raise ValueError(f"invalid limit {text!r}: {exc}") from exc
    window = int(item.get_expiry())
    if not 1 <= window <= _MAX_WINDOW:
        raise ValueError(f"window of {text!r} must be between a second and a year")
    if dimension == "cost":
        units = int(amount * COST_SCALE)
    else:
        if amount != amount.to_integral_value():
            raise ValueError(f"{dimension} limits must be whole numbers: {text!r}")
        units = int(amount)
    if units <= 0:
        raise ValueError(f"limit amount must be positive: {text!r}")
    return Limit(dimension, units, window, "", text)


@dataclass(frozen=True)
class Policy:
    """A set of limits. Each dimension takes a limit string, a list of them, or ``None``.

    ``concurrency``: at most this many requests in flight for the principal.
    ``output_estimate``: output tokens to reserve when the request sets no ``max_tokens``
    (``None`` = the limiter's default); a per-model or per-route policy's replaces it for
    that model or path (a route's first, then a model's, then its policy's own). An
    embeddings body reserves none, unless a route's or a model's policy sets one.
    ``models``: extra limits per model name.
    """

    requests: str | Iterable[str] | None = None
    tokens: str | Iterable[str] | None = None
    input_tokens: str | Iterable[str] | None = None
    output_tokens: str | Iterable[str] | None = None
    cost: str | Iterable[str] | None = None
    concurrency: int | None = None
    output_estimate: int | None = None
    models: Mapping[str, Policy] = field(default_factory=dict)
    limits: tuple[Limit, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed: list[Limit] = []
        for dim in DIMENSIONS:
            spec = getattr(self, dim)
            if spec is not None:
                if not isinstance(spec, str):
                    spec = _texts(dim, spec)
                    object.__setattr__(self, dim, spec)
                parsed.extend(parse_limits(dim, spec))
        if self.concurrency is not None and (
            isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int)
            or self.concurrency < 1
        ):
            raise ValueError(f"concurrency must be a positive integer or None, "
                             f"got {self.concurrency!r}")
        if self.output_estimate is not None and (
            isinstance(self.output_estimate, bool) or not isinstance(self.output_estimate, int)
            or self.output_estimate < 0
        ):
            raise ValueError(f"output_estimate must be a number of tokens >= 0 or None, "
                             f"got {self.output_estimate!r}")
        if not isinstance(self.models, Mapping):
            raise TypeError(
                "models takes a mapping of model name to Policy, such as "
                f"{{'gpt-4o': Policy(tokens='30000/minute')}}, got {self.models!r}"
            )
        for name, sub in self.models.items():
            if not isinstance(name, str) or not isinstance(sub, Policy):
                raise TypeError(f"models[{name!r}] must map a model name to a Policy")
            if sub.models:
                raise ValueError("a per-model policy cannot have models of its own")
        check_header_names(
            "models",
            ((name, [lim.scoped(f"model:{name}") for lim in sub.limits])
             for name, sub in self.models.items()),
        )
        object.__setattr__(self, "models", dict(self.models))
        object.__setattr__(self, "limits", tuple(parsed))

    @property
    def needs_tokens(self) -> bool:
        return any(lim.dimension != "requests" for lim in self.limits) or any(
            sub.needs_tokens for sub in self.models.values()
        )

    def limits_for(self, model: str | None) -> tuple[Limit, ...]:
        """This policy's limits plus those of ``model``'s sub-policy, if any."""
        sub = self.models.get(model) if model is not None else None
        if sub is None:
            return self.limits
        return self.limits + tuple(lim.scoped(f"model:{model}") for lim in sub.limits)

    def __hash__(self) -> int:
        return id(self)
