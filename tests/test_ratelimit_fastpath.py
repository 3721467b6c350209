"""The precomputed per-request paths equal their general forms: headers and integer cost."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimiddleware.context import RequestContext
from aimiddleware.errors import InvalidRequest
from aimiddleware.headers import go_duration
from aimiddleware.pricing import PriceTable
from aimiddleware.ratelimit.backend import WindowState
from aimiddleware.ratelimit.estimate import Estimate, Estimator
from aimiddleware.ratelimit.headers import HeaderPlan, go_ms, rate_limit_headers
from aimiddleware.ratelimit.policy import COST_SCALE, Policy
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.models import Usage

POLICY = Policy(
    requests="5/second;60/minute",
    tokens="1000/minute;100000/day",
    cost="2.50/day",
    input_tokens="700/minute",
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 200_000), st.integers(0, 200_000), st.floats(0, 1), st.integers(0, 3)
        ),
        min_size=len(POLICY.limits),
        max_size=len(POLICY.limits),
    ),
    st.sampled_from([0, 1, 7]),
    st.integers(0, 9),
)
def test_header_plan_renders_what_rate_limit_headers_computes(
    raw: list[tuple[int, int, float, int]], concurrency: int, in_flight: int
) -> None:
    states = []
    for lim, (prev, curr, at, index) in zip(POLICY.limits, raw, strict=True):
        window = lim.window * 1000
        states.append(WindowState(index, prev, curr, min(window - 1, int(at * window))))
    expected = rate_limit_headers(POLICY.limits, states, concurrency, in_flight)
    got = HeaderPlan(POLICY.limits, concurrency).render(states, in_flight)
    assert got == [(k.encode(), v.encode()) for k, v in expected]


# One limit per OpenAI dimension (the plan writes each row's headers as it goes), and the
# same limits with a route's requests limit after the tokens one (the general path).
SHAPES = [
    Policy(requests="100000000/minute", tokens="100000000000/minute", cost="100/day").limits,
    Policy(tokens="1000/minute", input_tokens="700/hour").limits
    + tuple(lim.scoped("route:/v1/x") for lim in Policy(requests="5/second").limits),
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(SHAPES),
    st.lists(
        st.tuples(
            st.integers(0, 200_000), st.integers(0, 200_000), st.floats(0, 1), st.integers(0, 3)
        ),
        min_size=3,
        max_size=3,
    ),
    st.sampled_from([0, 1, 10_000]),
    st.integers(0, 9),
)
def test_header_plan_on_other_shapes(
    limits: tuple[Any, ...], raw: list[tuple[int, int, float, int]], concurrency: int,
    in_flight: int,
) -> None:
    states = []
    for lim, (prev, curr, at, index) in zip(limits, raw, strict=True):
        window = lim.window * 1000
        states.append(WindowState(index, prev, curr, min(window - 1, int(at * window))))
    expected = rate_limit_headers(limits, states, concurrency, in_flight)
    plan = HeaderPlan(limits, concurrency)
    for _ in range(2):  # the second time from the plan's caches
        assert plan.render(states, in_flight) == [(k.encode(), v.encode()) for k, v in expected]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([POLICY.limits, *SHAPES]),
    st.lists(
        st.tuples(st.integers(-3, 1), st.floats(0, 1.2), st.floats(0, 1.2), st.floats(0, 0.5)),
        min_size=len(POLICY.limits),
        max_size=len(POLICY.limits),
    ),
    st.integers(1_700_000_000_000, 1_700_000_000_000 + 10**9),
    st.sampled_from([0, 1, 3]),
    st.integers(0, 3),
)
def test_headers_rendered_in_the_admission_pass_equal_rate_limit_headers(
    limits: tuple[Any, ...], raw: list[tuple[int, float, float, float]], now_ms: int,
    concurrency: int, in_flight: int,
) -> None:
    from aimiddleware.ratelimit.backend import Hit
    from aimiddleware.ratelimit.memory import MemoryBackend

    # Counters in any state (this window, the previous one, older; counts as fractions of
    # the limit), any cost, leases held.
    backend = MemoryBackend(clock=lambda: now_ms / 1000)
    backend.acquire_now("p", [])  # creates the entry
    hits = []
    for lim, (age, prev, curr, cost) in zip(limits, raw, strict=False):
        window, amount = lim.window * 1000, lim.amount
        counter = (now_ms // window + age, int(prev * amount), int(curr * amount), 0)
        backend._entries["p"].counters[lim.field] = counter
        hits.append(Hit(lim.field, window, amount, int(cost * amount)))
    for n in range(in_flight):
        backend._entries["p"].leases[f"held-{n}"] = now_ms + 60_000
    plan = HeaderPlan(limits, concurrency)
    span = 2 * max(h.window_ms for h in hits)
    rows = [(h.field, h.window_ms, h.limit, i) for i, h in enumerate(hits)]
    costs = [h.cost for h in hits]
    decision, headers = backend.acquire_rendered(
        "p", rows, costs, "l", concurrency, 30_000, span, plan
    )
    if not decision.allowed:
        assert headers is None
        return
    expected = rate_limit_headers(limits, decision.states, concurrency, decision.in_flight)
    assert headers == [(k.encode(), v.encode()) for k, v in expected]
    assert headers == plan.render(decision.states, decision.in_flight)


@settings(deadline=None)  # (hypothesis' 200 ms per example: a stalled machine fails it)
@given(st.integers(-5, 10**11))
def test_go_ms_is_go_duration_without_float_noise(ms: int) -> None:
    # go_duration(ms / 1000) may round up by one millisecond (binary floats); never down.
    ours, theirs = go_ms(ms), go_duration(ms / 1000)
    assert ours == theirs or go_ms(ms + 1) == theirs


@settings(deadline=None)  # (hypothesis' 200 ms per example: a stalled machine fails it)
@given(st.integers(0, 10**11))
def test_header_plan_duration_is_go_ms(ms: int) -> None:
    plan = HeaderPlan(POLICY.limits, 0)
    for _ in range(2):  # the second time from the plan's cache of whole seconds
        assert plan._duration(ms) == go_ms(ms).encode()
        assert plan._duration(ms + 1) == go_ms(ms + 1).encode()


def test_go_ms_examples() -> None:
    assert [go_ms(v) for v in (0, 12, 1000, 2500, 60_000, 360_000, 3_723_004)] == [
        "0s", "12ms", "1s", "2.5s", "1m0s", "6m0s", "1h2m3.004s",
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**7), st.integers(0, 10**6), st.integers(0, 10**6),
    st.integers(0, 10**6), st.integers(0, 10**6),
    st.sampled_from(["plain", "cached"]),
)
def test_integer_cost_equals_decimal_cost(
    inp: int, out: int, cached: int, created: int, reasoning: int, model: str
) -> None:
    prices = PriceTable({
        "plain": {"input": "0.15", "output": "0.60"},
        "cached": {"input": "3", "output": "15", "cached_input": "0.3",
                   "cache_creation": "3.75", "reasoning": "12.5"},
    })
    est = Estimator(None, prices, 16)
    price = prices.price(model)
    assert price is not None
    plain = (Decimal(inp) * price.input + Decimal(out) * price.output) / Decimal(10**6)
    assert est.price_units(model, inp, out) == math.ceil(plain * COST_SCALE)
    usage = Usage(
        input_tokens=inp + cached + created, output_tokens=out + reasoning,
        cached_input_tokens=cached, cache_creation_input_tokens=created,
        reasoning_tokens=reasoning,
    )
    actual = est.actual_cost(Estimate(model, 0, 0, Decimal(0)), usage, model)
    expected = prices.estimate(model, usage)
    assert expected is not None
    assert actual == math.ceil(expected * COST_SCALE)


BODIES = [
    {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "no cap"}]},
    {"model": "gpt-4o-mini", "max_tokens": -1, "max_completion_tokens": 20,
     "messages": [{"role": "user", "content": "bad cap, then a good one"}]},
    {"model": "gpt-4o-mini", "max_tokens": True, "max_output_tokens": 7, "input": "bool cap"},
    {"model": "gpt-4o-mini", "max_tokens": "64", "messages": []},
    {"model": "unpriced-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 9, "messages": [{"role": "user", "content": "no model"}]},
]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()  # one vocabulary load for the module


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("needs_cost", [True, False])
@pytest.mark.parametrize("version", [None, "gpt-4o-mini-2024-07-18"])
async def test_estimate_on_the_event_loop_equals_the_awaited_one(
    counter: TokenCounter, body: dict[str, Any], needs_cost: bool, version: str | None
) -> None:
    prices = PriceTable({"gpt-4o-mini": {"input": "0.15", "output": "0.60"}})
    policy = Policy(tokens="1000000/minute", output_estimate=None)
    raw = json.dumps(body).encode()

    def ctx() -> RequestContext:
        return RequestContext(request_id="r", principal="p", method="POST", path="/", body=raw,
                              model=body.get("model"), model_version=version)

    cold = Estimator(counter, prices, {"gpt-4o-mini": 300, "*": 500})
    warm = Estimator(counter, prices, {"gpt-4o-mini": 300, "*": 500})
    await warm.estimate(ctx(), policy, needs_body=True, needs_cost=needs_cost)  # loads, learns
    assert warm.estimate_now(ctx(), policy, True, needs_cost) is not None  # the flat path
    expected = await cold.estimate(ctx(), policy, needs_body=True, needs_cost=needs_cost)
    for _ in range(2):  # the second time from the warm estimator's caches
        got = await warm.estimate(ctx(), policy, needs_body=True, needs_cost=needs_cost)
        assert got == expected


async def test_estimate_of_a_body_that_is_not_json_or_not_an_object(
    counter: TokenCounter,
) -> None:
    est = Estimator(counter, None, 100)
    policy = Policy(tokens="1000/minute")
    text = RequestContext(request_id="r", principal="p", method="POST", path="/", body=b"x" * 40)
    got = await est.estimate(text, policy, needs_body=True, needs_cost=False,
                             content_type=b"text/plain")
    assert (got.input_tokens, got.output_tokens) == (10, 100)  # from the size: (40 + 3) // 4
    for bad in (b"[1, 2]", b"{not json"):
        ctx = RequestContext(request_id="r", principal="p", method="POST", path="/", body=bad)
        with pytest.raises(InvalidRequest):
            await est.estimate(ctx, policy, needs_body=True, needs_cost=False,
                               content_type=b"application/json; charset=utf-8")


@pytest.mark.parametrize("tiered", [False, True])
async def test_admit_now_and_finish_now_equal_admit_and_finish(tiered: bool) -> None:
    from aimiddleware.ratelimit.limiter import RateLimiter
    from aimiddleware.ratelimit.memory import MemoryBackend

    counter = TokenCounter(cache_size=0)
    prices = PriceTable({"gpt-4o-mini": {"input": "0.15", "output": "0.60"}})
    policy = Policy(requests="100/minute", tokens="100000/minute", cost="5/day", concurrency=3)
    now = [1_700_000_000.0]

    def limiter() -> RateLimiter:
        backend = MemoryBackend(clock=lambda: now[0])
        if tiered:  # tiers as a mapping: looked up inline; "p" is on "pro", not the default
            tiers = {"free": Policy(requests="1/minute"), "pro": policy}
            return RateLimiter(tiers, default_tier="free", tier={"p": "pro"}, backend=backend,
                               counter=counter, prices=prices)
        return RateLimiter(policy, backend=backend, counter=counter, prices=prices)

    def ctx() -> RequestContext:
        body = {"model": "gpt-4o-mini", "max_tokens": 64,
                "messages": [{"role": "user", "content": "hello there"}]}
        return RequestContext(request_id="r", principal="p", method="POST", path="/",
                              body=json.dumps(body).encode(), model="gpt-4o-mini")

    sync, chained = limiter(), limiter()
    assert sync._sync and sync.finishes_now
    chained._sync = False  # its admit() takes the general path (no admit_now)
    for lim in (sync, chained):  # a first request counts off the loop, warms the vocabulary
        first = ctx()
        await lim.finish(await lim.admit(first), first, failed=False)
    for step in range(6):
        now[0] += 7.5
        a, b = ctx(), ctx()
        got = sync.admit_now(a)
        assert got is not None
        want = await chained.admit(b)
        assert got.raw_headers == want.raw_headers and got.hits == want.hits
        assert got.decision == want.decision and got.estimate == want.estimate
        assert a.state["ratelimit"] is got
        if step % 2:
            a.usage = b.usage = Usage(input_tokens=5, output_tokens=step * 10)
        sync.finish_now(got, a, step == 4)
        if step % 3:
            await chained.finish(want, b, failed=step == 4)
        else:  # finish_now of an admission of admit()'s general path (it holds Hits)
            chained.finish_now(want, b, step == 4)
        key = "p"
        assert sync.backend._entries[key].counters == chained.backend._entries[key].counters  # type: ignore[attr-defined]
        assert not sync.backend._entries[key].leases  # type: ignore[attr-defined]

    # Anything that must await (or warn) is left to admit(): a tier function (it may block:
    # admit() runs it in a thread), a tier the policies do not name, a store that is not
    # in-process.
    tiers = {"default": policy}
    by_function = RateLimiter(tiers, tier=lambda p: "default", counter=counter, prices=prices)
    assert by_function.admit_now(ctx()) is None
    unknown = RateLimiter(tiers, tier={"p": "gold"}, counter=counter, prices=prices)
    assert unknown.admit_now(ctx()) is None
    assert (await unknown.admit(ctx())).decision is not None  # (the default tier, warned)


def test_finish_now_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    from aimiddleware.ratelimit.limiter import Admission, RateLimiter

    lim = RateLimiter(Policy(requests="5/minute"))
    broken = Admission("p", (), (), Estimate(None, 0, 0), None, None, 0, [])
    broken.decision = object()  # type: ignore[assignment]  # anything finish cannot read
    ctx = RequestContext(request_id="r", principal="p", method="POST", path="/", body=b"")
    lim.finish_now(broken, ctx, True)
    assert "reconciliation failed" in caplog.text
