"""PriceTable: Decimal prices per million tokens, cached/reasoning rules, loaders."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimiddleware.pricing import ModelPrice, PriceTable
from aimiddleware.usage.models import Usage

TABLE = PriceTable(
    {
        "gpt-4o": {"input": "2.50", "output": "10", "cached_input": "1.25"},
        "o3": ModelPrice(Decimal(2), Decimal(8), cached_input=Decimal("0.5")),
        "claude-sonnet-4-5": {"input": 3, "output": 15, "cached_input": "0.30",
                              "cache_creation": "3.75"},
        "thinker": {"input": 1, "output": 2, "reasoning": 4},
    },
    aliases={"fast": "gpt-4o"},
)


def test_plain_cost_is_exact_decimal() -> None:
    cost = TABLE.estimate("gpt-4o", Usage(input_tokens=1000, output_tokens=500))
    assert cost == Decimal("0.0075")  # 1000*2.5/1e6 + 500*10/1e6
    assert isinstance(cost, Decimal)


def test_cached_input_is_billed_at_the_cached_price() -> None:
    u = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=200)
    assert TABLE.estimate("gpt-4o", u) == Decimal("0.00725")


def test_cache_creation_and_reads() -> None:
    u = Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=600,
              cache_creation_input_tokens=300)
    want = (100 * Decimal(3) + 600 * Decimal("0.30") + 300 * Decimal("3.75")
            + 100 * Decimal(15)) / 1_000_000
    assert TABLE.estimate("claude-sonnet-4-5", u) == want


def test_reasoning_is_a_subset_of_output() -> None:
    u = Usage(input_tokens=0, output_tokens=1000, reasoning_tokens=400)
    assert TABLE.estimate("thinker", u) == (600 * 2 + 400 * 4) / Decimal(1_000_000)
    # without a reasoning price, reasoning tokens cost the output price (not double)
    assert TABLE.estimate("o3", u) == Decimal(8) * 1000 / 1_000_000


def test_unknown_model_is_unpriced_not_zero() -> None:
    assert TABLE.estimate("mystery-model", Usage(input_tokens=10)) is None
    assert TABLE.estimate(None, Usage()) is None
    assert TABLE.price("mystery-model") is None
    assert "mystery-model" not in TABLE and "fast" in TABLE


@pytest.mark.parametrize("zero", [Decimal("-0"), "-0.0", -0.0])
def test_a_negative_zero_price_is_zero(zero: Any) -> None:
    """A free model priced ``-0`` costs ``0``, never ``-0`` (in the envelope and headers)."""
    price = ModelPrice.coerce({"input": zero, "output": zero})
    usage = Usage(input_tokens=10, output_tokens=3)
    for cost in (price.cost(usage), price.quote(usage).cost,
                 PriceTable({"free": price}).estimate("free", usage)):
        assert cost == 0 and not cost.is_signed(), cost
    text = price.quote(usage).text
    assert text == format(price.cost(usage), "f") and text in ("0", "0.0"), text


def test_aliases_provider_prefix_and_snapshot_dates() -> None:
    gpt4o = TABLE.price("gpt-4o")
    assert TABLE.price("fast") is gpt4o
    assert TABLE.price("openai/gpt-4o") is gpt4o
    assert TABLE.price("gpt-4o-2024-08-06") is gpt4o
    assert TABLE.price("claude-sonnet-4-5-20250929") is TABLE.price("claude-sonnet-4-5")
    dated = PriceTable({"gpt-4o": {"input": 1, "output": 1},
                        "gpt-4o-2024-05-13": {"input": 5, "output": 15}})
    assert dated.price("gpt-4o-2024-05-13").input == Decimal(5)  # type: ignore[union-attr]


def test_from_json_and_toml_files(tmp_path: Path) -> None:
    j = tmp_path / "prices.json"
    j.write_text(json.dumps({"prices": {"m": {"input": "0.1", "output": "0.4"}},
                             "aliases": {"a": "m"}}))
    t = tmp_path / "prices.toml"
    t.write_text('[prices.m]\ninput = "0.1"\noutput = "0.4"\n\n[aliases]\na = "m"\n')
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"m": {"input": 0.1, "output": 0.4}}))
    u = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    for path in (j, t, flat):
        assert PriceTable.from_file(path).estimate("m", u) == Decimal("0.5")
    assert PriceTable.from_file(t).price("a") == PriceTable.from_file(j).price("m")


LITELLM_SAMPLE: dict[str, Any] = {
    "sample_spec": {"max_tokens": "LEGACY parameter", "input_cost_per_token": 0.0,
                    "output_cost_per_token": 0.0, "litellm_provider": "one of ..."},
    "gpt-4o": {"max_tokens": 16384, "input_cost_per_token": 2.5e-06,
               "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
               "litellm_provider": "openai", "mode": "chat"},
    "claude-sonnet-4-5": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                          "cache_creation_input_token_cost": 3.75e-06,
                          "cache_read_input_token_cost": 3e-07,
                          "litellm_provider": "anthropic", "mode": "chat"},
    "o1": {"input_cost_per_token": 1.5e-05, "output_cost_per_token": 6e-05,
           "output_cost_per_reasoning_token": 6e-05},
    "dall-e-3": {"output_cost_per_image": 0.04, "mode": "image_generation"},
}


def test_from_litellm(tmp_path: Path) -> None:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(LITELLM_SAMPLE))
    for table in (PriceTable.from_litellm(path), PriceTable.from_litellm(LITELLM_SAMPLE)):
        assert len(table) == 3  # sample_spec and the per-image model are skipped
        assert table.price("gpt-4o") == ModelPrice(Decimal("2.5"), Decimal(10),
                                                   cached_input=Decimal("1.25"))
        claude = table.price("claude-sonnet-4-5")
        assert claude is not None and claude.cache_creation == Decimal("3.75")
        assert claude.cached_input == Decimal("0.3")
        assert table.price("o1").reasoning == Decimal(60)  # type: ignore[union-attr]
        assert table.price("dall-e-3") is None


@pytest.mark.parametrize(
    ("prices", "aliases", "exc"),
    [
        ({"m": {"input": -1, "output": 1}}, None, ValueError),
        ({"m": {"input": "abc", "output": 1}}, None, ValueError),
        ({"m": {"input": True, "output": 1}}, None, TypeError),
        ({"m": {"input": 1}}, None, ValueError),
        ({"m": {"input": 1, "output": 1, "bogus": 1}}, None, ValueError),
        ({"m": {"input": "NaN", "output": 1}}, None, ValueError),
        ({"m": {"input": 1, "output": 1}}, {"a": "missing"}, ValueError),
        ({"m": 3}, None, TypeError),
    ],
)
def test_bad_tables_are_rejected(prices: Any, aliases: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        PriceTable(prices, aliases)


def test_lookups_are_remembered_and_bounded() -> None:
    from aimiddleware import pricing

    table = PriceTable({"gpt-4o": {"input": 1, "output": 2}}, aliases={"omni": "gpt-4o"})
    for _ in range(2):  # the second round answers from the per-table memo
        assert table.price("openai/gpt-4o-2024-08-06") is table.price("gpt-4o")
        assert table.price("omni") is table.price("gpt-4o")
        assert table.price("unknown-model") is None
    for i in range(pricing._RESOLVED_MAX + 10):
        table.price(f"m{i}")
    assert len(table._resolved) <= pricing._RESOLVED_MAX
    assert table.price("gpt-4o") is not None


_RATES = st.decimals(min_value=0, max_value=100_000, places=None, allow_nan=False,
                     allow_infinity=False).map(lambda d: Decimal(str(d)))
_TOKENS = st.integers(min_value=0, max_value=10**9)


@settings(max_examples=400, deadline=None)
@given(
    rates=st.tuples(_RATES, _RATES, st.none() | _RATES, st.none() | _RATES, st.none() | _RATES),
    tokens=st.tuples(_TOKENS, _TOKENS, _TOKENS, _TOKENS, _TOKENS),
)
def test_quote_is_exactly_cost(rates: Any, tokens: Any) -> None:
    """quote() (integer arithmetic, memo) gives cost()'s Decimal, its string and its nanos."""
    price = ModelPrice(rates[0], rates[1], cached_input=rates[2], reasoning=rates[3],
                       cache_creation=rates[4])
    inp, out, cached, created, reasoning = tokens
    usage = Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=cached,
                  cache_creation_input_tokens=created, reasoning_tokens=reasoning)
    want = price.cost(usage)
    for _ in range(2):  # computed, then remembered
        q = price.quote(usage)
        assert q.cost == want and q.cost.as_tuple() == want.as_tuple()
        assert q.text == format(want, "f")
        assert q.nanos == int((want * Decimal(10**9)).to_integral_value())


def test_quote_edge_cases_and_memo_bound() -> None:
    from aimiddleware import pricing

    cases = [
        ModelPrice(Decimal("0.15"), Decimal("0.60")),
        ModelPrice(Decimal("1E+1"), Decimal("2.5E+2"), cached_input=Decimal("0.0000001")),
        ModelPrice(Decimal(0), Decimal("0.000")),
        ModelPrice(Decimal("123456789012345678901234567"), Decimal(1)),  # past 28 digits
        ModelPrice(Decimal("0.0000000005"), Decimal("0.0000000015")),  # half-even nanos
    ]
    usages = [Usage(), Usage(input_tokens=12, output_tokens=1), Usage(input_tokens=10**9),
              Usage(input_tokens=1, output_tokens=3, reasoning_tokens=2)]
    for price in cases:
        for usage in usages:
            want = price.cost(usage)
            q = price.quote(usage)
            assert (q.cost.as_tuple(), q.text) == (want.as_tuple(), format(want, "f"))
            assert q.nanos == int((want * Decimal(10**9)).to_integral_value())
    price = cases[0]
    for i in range(pricing._QUOTES_MAX + 10):
        price.quote(Usage(input_tokens=i))
    assert len(price._quotes) <= pricing._QUOTES_MAX
    assert price == ModelPrice(Decimal("0.15"), Decimal("0.60"))  # the memo is not compared
    assert "_quotes" not in repr(price)


@settings(max_examples=200, deadline=None)
@given(
    rates=st.tuples(_RATES, _RATES, st.none() | _RATES, st.none() | _RATES, st.none() | _RATES),
    tokens=st.tuples(_TOKENS, _TOKENS, _TOKENS, _TOKENS, _TOKENS),
)
def test_nano_rates_are_the_exact_cost_in_nanos(rates: Any, tokens: Any) -> None:
    """sum(count * rate) / den is the cost in 1e-9 units exactly (what the rate limiter uses)."""
    from fractions import Fraction

    price = ModelPrice(rates[0], rates[1], cached_input=rates[2], reasoning=rates[3],
                       cache_creation=rates[4])
    den, nano = price.nano_rates()
    def _or(rate: Decimal | None, default: Decimal) -> Decimal:
        return default if rate is None else rate

    fallback = (price.input, _or(price.cached_input, price.input),
                _or(price.cache_creation, price.input), price.output,
                _or(price.reasoning, price.output))
    for count, rate, want in zip(tokens, nano, fallback, strict=True):
        assert Fraction(count * rate, den) == Fraction(count) * Fraction(want) * 1000
