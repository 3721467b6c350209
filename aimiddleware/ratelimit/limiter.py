"""``RateLimiter``: resolve a request's limits, admit it on all of them at once, reconcile.

Shared by :class:`~aimiddleware.ratelimit.middleware.RateLimitMiddleware` and the
:func:`~aimiddleware.ratelimit.decorator.rate_limit` decorator. One admission is one
backend call (one Lua script on Redis): every limit and the concurrency lease, all or none;
what it reserved comes back as an :class:`~aimiddleware.ratelimit.admission.Admission`
(re-exported here). The limiter also charges usage made outside a request (jobs) and fires
spend alerts.

One class on purpose: its steps share the resolved-limit cache, the in-process store's
direct entry points and the lease state, and the two that run on every request
(:meth:`RateLimiter.admit_now`, :meth:`RateLimiter.finish_now`) are written flat against
them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Union

import anyio
from starlette.concurrency import run_in_threadpool

from aimiddleware._asgi import is_async_callable
from aimiddleware.context import NO_MODEL_CALL, RequestContext
from aimiddleware.errors import InvalidRequest, StoreUnavailable
from aimiddleware.ratelimit import refusal
from aimiddleware.ratelimit._resolved import _all_limits, _Resolved
from aimiddleware.ratelimit.admission import Admission, _as_rows
from aimiddleware.ratelimit.backend import Adjustment, Backend, Decision, Hit, WindowState
from aimiddleware.ratelimit.estimate import Estimate, Estimator
from aimiddleware.ratelimit.memory import MemoryBackend
from aimiddleware.ratelimit.policy import COST_SCALE, Limit, Policy, check_header_names
from aimiddleware.storage import Storage
from aimiddleware.usage.models import Usage

__all__ = ["Admission", "RateLimiter", "SpendAlert"]

logger = logging.getLogger("aimiddleware.ratelimit")

TierSource = Union[Mapping[str, str], Callable[[str], Any]]  # noqa: UP007 (runtime alias, py3.10)
OverrideSource = Union[Mapping[str, Union[Policy, str]], Callable[[str], Any]]  # noqa: UP007


@dataclass(frozen=True)
class SpendAlert:
    """A principal crossed ``fraction`` of a budget (``used``/``limit`` in the dimension's unit;
    cost in currency units)."""

    principal: str
    dimension: str
    window: int
    fraction: float
    used: Decimal
    limit: Decimal
    name: str


def _route_limits(routes: Mapping[str, Policy]) -> Iterator[tuple[str, list[Limit]]]:
    """Each route's limits as ``_resolve`` scopes them: its own (``route:<path>``) and its
    models' (``route:<path>|model:<name>``)."""
    for pattern, pol in routes.items():
        scope = f"route:{pattern}"
        own = [lim.scoped(scope) for lim in pol.limits]
        own.extend(
            lim.scoped(f"{scope}|model:{model}")
            for model, sub in pol.models.items()
            for lim in sub.limits
        )
        yield pattern, own


class RateLimiter:
    """Policies, a backend, and the admission / reconciliation steps.

    ``policies``: one :class:`Policy` or ``{tier: Policy}``. ``tier``: mapping or sync/async
    callable ``principal -> tier name | None`` (``None`` = ``default_tier``). ``overrides``:
    mapping or callable ``principal -> Policy | tier name | None``. ``routes``: extra policies
    by path (``"/v1/embeddings"`` or a prefix ``"/v1/*"``). ``fail_open``: admit (and log)
    when the store is down instead of answering a typed 503.
    """

    def __init__(
        self,
        policies: Policy | Mapping[str, Policy],
        *,
        tier: TierSource | None = None,
        default_tier: str = "default",
        overrides: OverrideSource | None = None,
        routes: Mapping[str, Policy] | None = None,
        storage: Storage | str | None = None,
        backend: Backend | None = None,
        namespace: str = "rl",
        counter: Any | None = None,
        prices: Any | None = None,
        output_estimate: int | Mapping[str, int] = 1024,
        on_unpriced: Literal["allow", "reject"] = "allow",
        fail_open: bool = False,
        lease_ttl: float = 30.0,
        alert_fractions: tuple[float, ...] = (),
        on_alert: Callable[[SpendAlert], Any] | None = None,
        name: str = "rate limit",
    ) -> None:
        if isinstance(policies, Policy):
            policies = {default_tier: policies}
        if not policies or not all(isinstance(p, Policy) for p in policies.values()):
            raise TypeError("policies must be a Policy or a non-empty {tier: Policy} mapping")
        if default_tier not in policies:
            raise ValueError(f"default_tier {default_tier!r} is not among the policies")
        # (a str, a list or a Policy was called on each request: every request a 500)
        if tier is not None and not isinstance(tier, Mapping) and not callable(tier):
            everyone = f" (one tier for everyone: default_tier={tier!r})" if isinstance(
                tier, str) else ""
            raise TypeError(
                "tier takes a mapping of principal to tier name, such as {'sk-1': 'pro'}, or "
                f"a callable (principal) -> tier name or None{everyone}, got {tier!r}"
            )
        if overrides is not None and not isinstance(overrides, Mapping) and not callable(overrides):
            raise TypeError(
                "overrides takes a mapping of principal to Policy or tier name, such as "
                "{'sk-1': Policy(requests='600/minute')}, or a callable (principal) -> "
                f"Policy, tier name or None, got {overrides!r}"
            )
        if routes is not None and not isinstance(routes, Mapping):  # (an AttributeError)
            raise TypeError(
                "routes takes a mapping of path (or '/prefix*') to Policy, such as "
                f"{{'/v1/embeddings': Policy(tokens='1000000/minute')}}, got {routes!r}"
            )
        for pattern, pol in (routes or {}).items():
            if (
                not isinstance(pol, Policy)
                or not isinstance(pattern, str)
                or not pattern.startswith("/")
            ):
                raise ValueError(f"routes[{pattern!r}] must map a path to a Policy")
        check_header_names("routes", _route_limits(routes or {}))
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        if isinstance(alert_fractions, (str, bytes)) or not isinstance(alert_fractions, Iterable):
            raise TypeError(
                "alert_fractions takes a sequence of fractions of a cost limit, such as "
                f"(0.5, 0.9), got {alert_fractions!r}"
            )
        alert_fractions = tuple(alert_fractions)
        if any(
            isinstance(f, bool) or not isinstance(f, (int, float, Decimal)) or not 0 < f <= 1
            for f in alert_fractions
        ):
            raise ValueError(f"alert_fractions must be in (0, 1], got {alert_fractions!r}")
        if alert_fractions and on_alert is None:
            raise ValueError("alert_fractions need an on_alert callback")
        if on_unpriced not in ("allow", "reject"):
            raise ValueError("on_unpriced must be 'allow' or 'reject'")
        every = [*policies.values(), *(routes or {}).values()]
        if prices is None and any(
            lim.dimension == "cost" for pol in every for lim in _all_limits(pol)
        ):
            raise ValueError("cost limits need prices=PriceTable(...)")
        self.policies = dict(policies)
        self.tier = tier
        self.default_tier = default_tier
        self.overrides = overrides
        self.routes = dict(routes or {})
        self.storage = Storage.coerce(storage)
        if backend is None:
            if self.storage.is_memory:
                backend = MemoryBackend()
            else:
                from aimiddleware.ratelimit.redis import RedisBackend

                backend = RedisBackend(self.storage, namespace=namespace)
        self.backend: Backend = backend
        # The in-process backend's steps never await: call them directly (no coroutine per
        # request), unless a subclass replaced the async methods.
        self._acquire_now: Callable[..., Decision] | None = None
        self._acquire_rendered: Callable[..., tuple[Decision, Any]] | None = None
        self._reconcile_now: Callable[..., None] | None = None
        if isinstance(backend, MemoryBackend):
            kind = type(backend)
            if kind.acquire is MemoryBackend.acquire:
                self._acquire_now = backend.acquire_now
                self._acquire_rendered = backend.acquire_rendered
            if kind.adjust is MemoryBackend.adjust:
                self._reconcile_now = backend.reconcile_now
        self.estimator = Estimator(counter, prices, output_estimate)
        self.on_unpriced = on_unpriced
        self.fail_open = fail_open
        self.lease_ttl_ms = int(lease_ttl * 1000)
        # In-process leases die with their holder: only a shared store needs TTL refreshes.
        self.refreshes = bool(getattr(backend, "shared", True))
        self._lease_ttl_ms = self.lease_ttl_ms if self.refreshes else _IN_PROCESS_LEASE_MS
        self._lease_prefix = secrets.token_hex(6) + "-"
        self._lease_ids = itertools.count()
        self._default_policy = self.policies[default_tier]
        self._plain: dict[str | None, _Resolved] = {}  # default policy, no route
        self._resolved: dict[tuple[Policy, str | None, str | None], _Resolved] = {}
        self.alert_fractions = tuple(sorted(alert_fractions))
        self.on_alert = on_alert
        self.name = name
        #: finish_now() does what finish() does, and no lease needs refreshing meanwhile (an
        #: in-process store: its adjust never awaits)
        self.finishes_now = self._reconcile_now is not None and not self.refreshes
        # admit_now can admit on its own: nothing to await (store, tier lookup, alerts); a
        # tier given as a mapping is looked up inline (a callable may block: admit() calls it)
        self._sync = (
            self._acquire_now is not None
            and overrides is None
            and (tier is None or isinstance(tier, Mapping))
            and not self.routes
            and not self.alert_fractions
        )

    # -- policy resolution ------------------------------------------------------------------

    async def _call(self, source: Any, principal: str) -> Any:
        if isinstance(source, Mapping):
            return source.get(principal)
        if is_async_callable(source):
            return await source(principal)
        return await run_in_threadpool(source, principal)

    async def policy_for(self, principal: str) -> Policy:
        found: Any = None
        if self.overrides is not None:
            found = await self._call(self.overrides, principal)
            if isinstance(found, Policy):
                return found
        if found is None and self.tier is not None:
            found = await self._call(self.tier, principal)
        if found is not None and found not in self.policies:
            logger.warning("unknown rate-limit tier %r; using %r", found, self.default_tier)
            found = None
        return self.policies[found if found is not None else self.default_tier]

    def route_policy(self, path: str) -> tuple[str, Policy] | None:
        if path in self.routes:
            return path, self.routes[path]
        best: tuple[str, Policy] | None = None
        for pattern, pol in self.routes.items():
            if (
                pattern.endswith("*")
                and path.startswith(pattern[:-1])
                and (best is None or len(pattern) > len(best[0]))
            ):
                best = (pattern, pol)
        return best

    def _resolve(
        self,
        policy: Policy,
        route: tuple[str, Policy] | None,
        model: str | None,
    ) -> _Resolved:
        """The limits of (policy, route, model), computed once and cached."""
        # Keyed by the objects (held here, so an id is never reused by another policy).
        key = (policy, route[0] if route else None, model)
        found = self._resolved.get(key)
        if found is not None:
            return found
        pols = [p for p in (policy, route[1] if route else None) if p is not None]
        limits = list(policy.limits_for(model))
        concurrency = policy.concurrency or 0
        if route is not None:
            scope = f"route:{route[0]}"
            # (a per-model limit of the route keeps its model: route:<path>|model:<name>)
            limits.extend(
                lim.scoped(f"{scope}|{lim.scope}" if lim.scope else scope)
                for lim in route[1].limits_for(model)
            )
        found = _Resolved(
            tuple(limits),
            concurrency,
            needs_body=any(p.needs_tokens or bool(p.models) for p in pols),
            needs_cost=any(lim.dimension == "cost" for p in pols for lim in _all_limits(p)),
        )
        if len(self._resolved) < 10_000:  # bounded: models come from request bodies
            self._resolved[key] = found
            if route is None and policy is self._default_policy:
                self._plain[model] = found
        return found

    # -- admission --------------------------------------------------------------------------

    def admit_now(self, ctx: RequestContext, content_type: bytes | None = None) -> Admission | None:
        """:meth:`admit` when it needs no ``await`` (the in-process store, tiers as a mapping
        or none, no override or route lookup, no spend alert, the body counted on the loop),
        else ``None``: call ``admit``.

        Runs on every request: written flat (no helper calls on the common path)."""
        if not self._sync:
            return None
        model = ctx.model
        policy = self._default_policy
        if self.tier is not None:  # a mapping (policy_for's lookup, inline)
            found = self.tier.get(ctx.principal)  # type: ignore[union-attr]
            if found is not None:
                policy = self.policies.get(found)  # type: ignore[assignment]
                if policy is None:  # unknown: admit() warns, then uses the default tier
                    return None
        if policy is self._default_policy:
            res = self._plain.get(model) or self._resolve(policy, None, model)
        else:
            res = self._resolve(policy, None, model)
        estimate = self.estimator.estimate_now(
            ctx, policy, res.needs_body, res.needs_cost, content_type
        )
        if estimate is None:  # the body must be counted off the event loop
            return None
        if estimate.model != model:
            res = (
                self._plain.get(estimate.model) if policy is self._default_policy else None
            ) or self._resolve(policy, None, estimate.model)
        if res.needs_cost and estimate.cost_units is None and self.on_unpriced == "reject":
            return None  # admit() raises the refusal
        inp, out = estimate.input_tokens, estimate.output_tokens
        # What the request costs in each dimension (res.rows index it: no Hit is built)
        by_code = (estimate.requests, inp + out, inp, out, estimate.cost_units or 0)
        for code, cap in res.caps:
            if by_code[code] > cap:  # more than a whole window: never admissible
                return None  # admit() raises the refusal
        principal = ctx.principal
        if "{" in principal or "}" in principal or len(principal) > 200:  # _key, inlined
            principal = _key(principal)
        concurrency = res.concurrency
        lease = f"{self._lease_prefix}{next(self._lease_ids)}" if concurrency else None
        # (the headers are rendered in the same pass over the counters)
        decision, headers = self._acquire_rendered(  # type: ignore[misc]
            principal, res.rows, by_code, lease, concurrency, self._lease_ttl_ms, res.span,
            res.plan,
        )
        if not decision[0]:  # decision.allowed
            raise refusal.refused(res.limits, self._hits(res, estimate), decision, concurrency)
        # Admission(...), without the class call (not specialized on Python 3.11)
        admission: Admission = _new_object(Admission)
        admission.principal = principal
        admission.limits = res.limits
        admission._hits = None  # (built when read)
        admission._rows = res.rows
        admission._reserved = by_code
        admission.estimate = estimate
        admission.decision = decision
        admission.lease = lease
        admission.concurrency = concurrency
        admission.held = ""  # (in-process: nothing to hold)
        admission.done = False
        admission.stop_refresh = None
        admission.raw_headers = headers
        admission._codes = res.codes
        ctx.state["ratelimit"] = admission
        return admission

    async def admit(
        self, ctx: RequestContext, *, content_type: bytes | None = None
    ) -> Admission:
        """Reserve the request on every limit at once, or raise the typed refusal."""
        if self._sync:
            found = self.admit_now(ctx, content_type)
            if found is not None:
                return found
        principal = ctx.principal
        if "{" in principal or "}" in principal or len(principal) > 200:  # _key, inlined
            principal = _key(principal)
        if self.overrides is None and self.tier is None:
            policy = self._default_policy
        else:
            policy = await self.policy_for(ctx.principal)
        route = self.route_policy(ctx.path) if self.routes else None
        model = ctx.model
        res = None
        if route is None and policy is self._default_policy:
            res = self._plain.get(model)
        if res is None:
            res = self._resolve(policy, route, model)
        estimator = self.estimator
        # (the route's output_estimate before the caller's policy's: the most specific first)
        specific: tuple[Policy, ...] = () if route is None else (route[1],)
        estimate = estimator.estimate_now(
            ctx, policy, res.needs_body, res.needs_cost, content_type, specific
        )
        if estimate is None:  # the body must be counted off the event loop
            estimate = await estimator.estimate(
                ctx,
                policy,
                needs_body=res.needs_body,
                needs_cost=res.needs_cost,
                content_type=content_type,
                specific=specific,
            )
        if estimate.model != model:
            res = None
            if route is None and policy is self._default_policy:
                res = self._plain.get(estimate.model)
            if res is None:
                res = self._resolve(policy, route, estimate.model)
        limits, concurrency = res.limits, res.concurrency
        hits = self._hits(res, estimate)
        # A shared store holds what the request reserves under its lease (refunded if the
        # worker dies before finish): a lease then, even without a concurrency limit.
        held = res.held
        if held and not (self.refreshes and any(h[3] for h, c in zip(hits, res.codes) if c)):  # noqa: B905
            held = ""
        lease = f"{self._lease_prefix}{next(self._lease_ids)}" if concurrency or held else None
        headers = None
        try:
            if self._acquire_rendered is not None:
                rows, costs = _as_rows(hits)
                decision, headers = self._acquire_rendered(
                    principal, rows, costs, lease, concurrency, self._lease_ttl_ms, res.span,
                    res.plan,
                )
            else:
                decision = await self.backend.acquire(
                    principal,
                    hits,
                    lease=lease,
                    concurrency=concurrency,
                    lease_ttl_ms=self._lease_ttl_ms,
                    held=held,
                )
        except StoreUnavailable as exc:
            if not self.fail_open:
                raise StoreUnavailable(
                    f"The {self.name} store is unavailable; the request was not admitted.",
                    retry_after=1,
                    extra={"limiter": self.name},
                ) from exc
            logger.warning("%s store unavailable; admitting without limits (fail-open)", self.name)
            unchecked = Admission(principal, limits, hits, estimate, None, None, 0, [], res.codes)
            ctx.state["ratelimit"] = unchecked
            return unchecked
        if not decision.allowed:
            raise refusal.refused(limits, hits, decision, concurrency)
        admission = Admission(
            principal,
            limits,
            hits,
            estimate,
            decision,
            lease,
            concurrency,
            res.plan.render(decision.states, decision.in_flight) if headers is None else headers,
            res.codes,
            held,
        )
        ctx.state["ratelimit"] = admission
        if self.alert_fractions:
            await self._alerts(ctx.principal, admission)
        return admission

    def _hits(self, res: _Resolved, estimate: Estimate) -> tuple[Hit, ...]:
        """What ``estimate`` charges on each of ``res``'s limits, or the typed refusal of a
        request that could never be admitted."""
        if res.needs_cost and estimate.cost_units is None and self.on_unpriced == "reject":
            raise InvalidRequest(
                f"Model {estimate.model!r} has no price, and this caller has a cost budget.",
                param="model",
            )
        inp, out = estimate.input_tokens, estimate.output_tokens
        by_code = (estimate.requests, inp + out, inp, out, estimate.cost_units or 0)
        built: list[Hit] = []
        for f, w, amount, code in res.rows:
            cost = by_code[code]
            if cost > amount:  # more than a whole window: never admissible
                raise refusal.too_large(res.limits[len(built)], cost)
            built.append(_new_tuple(Hit, (f, w, amount, cost)))  # Hit(f, w, amount, cost)
        return tuple(built)

    # -- reconciliation ---------------------------------------------------------------------

    def settled(self, admission: Admission, ctx: RequestContext, *, failed: bool) -> bool:
        """True when :meth:`finish` has nothing to do (no lease, nothing to correct)."""
        return admission.decision is None or (
            admission.lease is None
            and ctx.usage is None
            and not failed
            and NO_MODEL_CALL not in ctx.state
        )

    async def finish(self, admission: Admission, ctx: RequestContext, *, failed: bool) -> None:
        """Replace the reservation by the real usage, refund a failed call, release the lease.

        Call it in a ``finally`` under a shielded cancel scope.
        """
        if admission.decision is None:
            return
        lease = admission.lease
        if self._reconcile_now is not None:  # in-process: one pass, never unavailable
            used = self._used(admission, ctx, failed)
            if used is not None:
                rows, reserved = admission._as_rows()
                self._reconcile_now(
                    admission.principal,
                    rows,
                    admission.decision.states,
                    admission._codes,
                    reserved,
                    used,
                    lease,
                )
            elif lease is not None:
                self._reconcile_now(admission.principal, (), (), (), (), (), lease)
            return
        adjustments = self._adjustments(admission, ctx, failed)
        if not adjustments and lease is None:
            return
        try:
            await self.backend.adjust(
                admission.principal,
                [_new_tuple(Adjustment, adj) for adj in adjustments],
                release=lease,
            )
        except StoreUnavailable:
            logger.warning("%s store unavailable; reconciliation skipped", self.name)

    def finish_now(self, admission: Admission, ctx: RequestContext, failed: bool) -> None:
        """:meth:`finish` as a plain call, when :attr:`finishes_now` (the in-process store:
        nothing to await, so nothing can interrupt it). Never raises: bookkeeping must not
        hide the response or the real error.

        Runs on every request: written flat (no helper calls on the common path)."""
        try:
            decision = admission.decision
            if decision is None:
                return
            usage = ctx.usage
            if usage is None and not failed:
                if NO_MODEL_CALL not in ctx.state:  # nothing to correct
                    if admission.lease is not None:
                        self._reconcile_now(  # type: ignore[misc]
                            admission.principal, (), (), (), (), (), admission.lease
                        )
                    return
                by_code: tuple[int, ...] = _NO_MODEL_CALL_USED  # one request, nothing else
            elif usage is None:
                by_code = (0, 0, 0, 0, 0)
            else:
                inp, out = usage.input_tokens, usage.output_tokens
                cost = admission.estimate.cost_units
                if cost is not None:  # estimator.actual_cost, inlined for plain usage
                    model = ctx.model_version or ctx.model or admission.estimate.model
                    fast = self.estimator._int_prices.get(model) if model else None
                    if fast is None or (
                        usage.cached_input_tokens
                        or usage.cache_creation_input_tokens
                        or usage.reasoning_tokens
                    ):
                        cost = self.estimator.actual_cost(admission.estimate, usage, model)
                    else:  # fast.usage(usage) without the cache and reasoning terms
                        cost = -(-(inp * fast.input + out * fast.output) // fast.den)
                by_code = (1, inp + out, inp, out, cost or 0)
            # the adjustments are computed by the store in its pass over the counters
            rows = admission._rows
            if rows is None:  # (an admission of admit()'s general path)
                rows, reserved = admission._as_rows()
            else:
                reserved = admission._reserved
            self._reconcile_now(  # type: ignore[misc]
                admission.principal,
                rows,
                decision[2],  # decision.states
                admission._codes,
                reserved,
                by_code,
                admission.lease,
            )
        except Exception:
            logger.exception("rate-limit reconciliation failed")

    def _used(
        self, admission: Admission, ctx: RequestContext, failed: bool
    ) -> tuple[int, ...] | None:
        """What the request really used, by dimension code (None: nothing to correct)."""
        usage = ctx.usage
        if usage is None:
            if failed:
                return (0, 0, 0, 0, 0)
            return _NO_MODEL_CALL_USED if NO_MODEL_CALL in ctx.state else None
        inp, out = usage.input_tokens, usage.output_tokens
        cost = self.estimator.actual_cost(admission.estimate, usage, ctx.model_version or ctx.model)
        return (1, inp + out, inp, out, cost or 0)

    def _adjustments(
        self, admission: Admission, ctx: RequestContext, failed: bool
    ) -> list[tuple[str, int, int, int, int]]:
        """Adjustment's fields per limit whose reservation differs from the real usage, or
        that the lease held (charged back if the store refunded it meanwhile)."""
        adjustments: list[tuple[str, int, int, int, int]] = []
        by_code = self._used(admission, ctx, failed)
        held = admission.held
        if by_code is None and not held:
            return adjustments
        assert admission.decision is not None
        # (no strict=: a keyword makes the call slower; the three have the same length)
        rows = zip(admission.hits, admission.decision.states, admission._codes)  # noqa: B905
        for i, (hit, state, code) in enumerate(rows):
            cost = hit[3]  # hit.cost
            delta = 0 if by_code is None else by_code[code] - cost
            back = cost if held and held[i] == "1" else 0
            if delta or back:  # usage equal to the reservation, not held: nothing to do
                adjustments.append((hit[0], hit[1], state[0], delta, back))
        return adjustments

    async def charge(
        self,
        principal: str,
        usage: Usage,
        *,
        model: str | None = None,
        cost: Decimal | None = None,
    ) -> bool:
        """Charge usage made outside a request to ``principal``'s token and cost limits: a
        job's or a batch item's model calls (``JobsRouter(limiter=...)``). True when one of
        those limits is now spent (at or past its amount): stop spending (a job ends
        ``quota_exceeded``).

        Nothing is admitted (the work is done), so a window may go past its limit; the
        principal's next requests are then refused until it rolls. Requests, concurrency
        and route-scoped limits are not charged; per-model limits only with ``model``.
        ``cost`` (in the price table's currency) is used as given, else ``usage`` is
        priced for ``model``. Never raises (logged): the caller's work must not fail for
        its bookkeeping, and the charge is shielded from its cancellation."""
        try:
            rows = await self._budget_rows(principal, model)
            units: int | None
            if cost is not None:
                units = math.ceil(Decimal(cost) * COST_SCALE)
            else:
                units = self.estimator.actual_cost(
                    Estimate(model, 0, 0, cost_units=0), usage, model
                )
            inp, out = usage.input_tokens, usage.output_tokens
            by_code = (0, inp + out, inp, out, units or 0)
            adjustments = [  # (a charge goes to the current window: no window number needed)
                Adjustment(field, window_ms, 0, by_code[code])
                for field, window_ms, _, code in rows
                if by_code[code] > 0
            ]
            if not adjustments:
                return False
            with anyio.CancelScope(shield=True):
                await self.backend.adjust(_key(principal), adjustments)
                return await self._spent(principal, rows)
        except StoreUnavailable:
            logger.warning("%s store unavailable; usage of %s not charged", self.name, principal)
        except Exception:
            logger.exception("charging usage of %s failed", principal)
        return False

    async def spent(self, principal: str, *, model: str | None = None) -> bool:
        """Whether one of ``principal``'s token or cost limits is spent (at or past its
        amount) now: work charged with :meth:`charge` should not start. False when the
        store cannot tell (logged)."""
        try:
            return await self._spent(principal, await self._budget_rows(principal, model))
        except StoreUnavailable:
            logger.warning("%s store unavailable; %s's budget not checked", self.name, principal)
        except Exception:
            logger.exception("checking the budget of %s failed", principal)
        return False

    async def _budget_rows(
        self, principal: str, model: str | None
    ) -> list[tuple[str, int, int, int]]:
        """The storage rows of ``principal``'s token and cost limits (all but requests)."""
        res = self._resolve(await self.policy_for(principal), None, model)
        return [row for row in res.rows if row[3]]

    async def _spent(self, principal: str, rows: Sequence[tuple[str, int, int, int]]) -> bool:
        states = await self.backend.peek(_key(principal), [Hit(f, w, a, 0) for f, w, a, _ in rows])
        return any(
            _used(state, window) >= amount
            for (_, window, amount, _), state in zip(rows, states, strict=True)
        )

    async def refresh(self, admission: Admission) -> None:
        if admission.lease is not None:
            await self.backend.refresh(
                admission.principal,
                admission.lease,
                self.lease_ttl_ms,
                concurrent=admission.concurrency > 0,
                held=bool(admission.held),
            )

    # -- spend alerts -----------------------------------------------------------------------

    async def _alerts(self, principal: str, admission: Admission) -> None:
        assert admission.decision is not None
        rows = zip(admission.limits, admission.hits, admission.decision.states, strict=False)
        for lim, hit, state in rows:
            if lim.dimension == "requests" or hit.cost <= 0:
                continue
            after = _used(state, hit.window_ms)
            before = after - hit.cost
            for fraction in self.alert_fractions:
                mark = fraction * lim.amount
                if not before < mark <= after:
                    continue
                tag = f"{hit.field}:{state.window}:{fraction}"
                try:
                    ttl = 2 * hit.window_ms
                    fresh = await self.backend.mark_once(admission.principal, tag, ttl)
                except StoreUnavailable:
                    fresh = False
                if fresh:
                    await self._fire(principal, lim, fraction, after)

    async def _fire(self, principal: str, lim: Limit, fraction: float, used: float) -> None:
        scale = COST_SCALE if lim.dimension == "cost" else Decimal(1)
        alert = SpendAlert(
            principal,
            lim.dimension,
            lim.window,
            fraction,
            Decimal(int(used)) / scale,
            Decimal(lim.amount) / scale,
            lim.name,
        )
        assert self.on_alert is not None
        try:
            result = self.on_alert(alert)
            if isinstance(result, Awaitable):
                await result
        except Exception:
            logger.exception("spend alert callback failed")


_IN_PROCESS_LEASE_MS = 10 * 365 * 86_400_000


_new_tuple = tuple.__new__  # a NamedTuple from a tuple, without a Python-level __new__ call
_new_object = object.__new__
_NO_MODEL_CALL_USED = (1, 0, 0, 0, 0)  # by dimension code: one request, nothing else


def _used(state: WindowState, window: int) -> float:
    return float(state.prev) * float(window - state.elapsed_ms) / float(window) + float(state.curr)


def _key(principal: str) -> str:
    """A principal safe inside a ``{hash tag}``."""
    if "{" in principal or "}" in principal or len(principal) > 200:
        return "h_" + hashlib.sha256(principal.encode()).hexdigest()[:32]
    return principal
