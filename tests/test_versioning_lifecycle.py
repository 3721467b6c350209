from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import http_sfv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimiddleware.headers import parse_http_date, parse_sf_date, sf_date
from aimiddleware.versioning import Lifecycle, merge_headers
from aimiddleware.versioning.lifecycle import as_utc


def _sf_date(value: str) -> datetime:
    item = http_sfv.Item()
    item.parse(value.encode())
    assert isinstance(item.value, datetime)
    return item.value.replace(tzinfo=UTC)


def test_rfc_9745_example_round_trips() -> None:
    lc = Lifecycle.of(deprecated="2023-06-30T23:59:59Z", sunset="2024-06-30T23:59:59Z")
    headers = dict(lc.headers())
    assert headers["deprecation"] == "@1688169599"
    assert headers["sunset"] == "Sun, 30 Jun 2024 23:59:59 GMT"
    assert _sf_date(headers["deprecation"]) == as_utc("2023-06-30T23:59:59Z")
    assert parse_http_date(headers["sunset"]) == as_utc("2024-06-30T23:59:59Z")


def test_sunset_before_deprecation_is_rejected_at_configuration() -> None:
    with pytest.raises(ValueError, match=r"Sunset .* must not be earlier than Deprecation"):
        Lifecycle.of(deprecated="2026-06-01", sunset="2026-05-31")
    # equal is allowed (RFC 9745: not earlier)
    assert Lifecycle.of(deprecated="2026-06-01", sunset="2026-06-01").sunset_at is not None


def test_dates_accept_date_datetime_and_iso() -> None:
    a = Lifecycle.of(deprecated=date(2026, 1, 1))
    b = Lifecycle.of(deprecated=datetime(2026, 1, 1))
    c = Lifecycle.of(deprecated="2026-01-01T00:00:00+00:00")
    assert a.deprecated_at == b.deprecated_at == c.deprecated_at
    with pytest.raises(ValueError):
        Lifecycle.of(deprecated="next tuesday")
    with pytest.raises(TypeError):
        Lifecycle(deprecated_at="2026-01-01")  # type: ignore[arg-type]


def test_links_are_validated() -> None:
    with pytest.raises(ValueError, match="deprecation_link"):
        Lifecycle.of(deprecated="2026-01-01", deprecation_link="https://x.example/a b")


def test_status_over_time() -> None:
    lc = Lifecycle.of(deprecated="2026-01-01", sunset="2026-07-01")
    assert lc.status(as_utc("2025-12-01")) == "deprecated"  # announced ahead: still signalled
    assert lc.status(as_utc("2026-06-30T23:59:59Z")) == "deprecated"
    assert lc.status(as_utc("2026-07-01")) == "retired"
    assert Lifecycle().status(as_utc("2030-01-01")) == "active"
    assert Lifecycle().headers() == []
    assert Lifecycle(retired=True).status(as_utc("2000-01-01")) == "retired"


def test_merged_headers_keep_sunset_not_before_deprecation_and_parse() -> None:
    model = Lifecycle.of(
        deprecated="2026-01-01",
        sunset="2026-07-01",
        deprecation_link="https://docs.example/dep",
        sunset_link="https://docs.example/sunset",
        successor_link="https://docs.example/next",
    )
    version = Lifecycle.of(deprecated="2026-02-01", sunset="2026-09-01",
                           deprecation_link="https://docs.example/dep")
    headers = dict(merge_headers([model, version, Lifecycle()]))
    dep = _sf_date(headers["deprecation"])
    sunset = parse_http_date(headers["sunset"])
    assert dep == as_utc("2026-01-01") and sunset == as_utc("2026-07-01")
    assert sunset >= dep
    link = headers["link"]
    assert link.count('rel="deprecation"') == 1  # de-duplicated
    assert '<https://docs.example/sunset>; rel="sunset"' in link
    assert '<https://docs.example/next>; rel="successor-version"' in link


def test_sunset_only_lifecycle_signals_deprecation_at_sunset() -> None:
    headers = dict(Lifecycle.of(sunset="2026-07-01").headers())
    assert _sf_date(headers["deprecation"]) == parse_http_date(headers["sunset"])


@settings(deadline=None)  # (hypothesis' 200 ms per example: a stalled machine fails it)
@given(
    dep=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2999, 1, 1)),
    gap=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650)),
)
def test_any_valid_lifecycle_yields_parseable_ordered_headers(
    dep: datetime, gap: timedelta
) -> None:
    lc = Lifecycle(deprecated_at=dep, sunset_at=dep + gap, deprecation_link="https://d.example/x")
    headers = dict(lc.headers())
    d = _sf_date(headers["deprecation"])
    s = parse_http_date(headers["sunset"])
    assert s >= d  # whole seconds on both sides: flooring never reorders them
    assert headers["link"] == '<https://d.example/x>; rel="deprecation"; type="text/html"'


def test_http_dates_past_year_9999_in_utc_are_not_dates() -> None:
    import pytest

    with pytest.raises(ValueError):  # (converting it to UTC overflows: never an OverflowError)
        parse_http_date("Fri, 31 Dec 9999 23:59:59 -1400")


def test_names_and_versions_with_a_trailing_newline_are_refused() -> None:
    # `$` also matches before a final newline: the patterns must end at the very end.
    from aimiddleware.headers import sf_string
    from aimiddleware.versioning.api_versions import path_style, well_formed
    from aimiddleware.versioning.registry import ModelRegistry

    assert not path_style("v1\n") and not well_formed("2025-01-01\n") and well_formed("v1")
    import pytest

    with pytest.raises(ValueError):
        ModelRegistry().add_snapshot("model-1\n")
    with pytest.raises(ValueError):
        sf_string("policy\n")


@settings(max_examples=50)
@given(st.integers(min_value=-(10**9), max_value=10**11))  # (datetime's range)
def test_parse_sf_date_reads_what_an_sfv_parser_reads(seconds: int) -> None:
    written = sf_date(seconds)
    assert parse_sf_date(written) == seconds == int(_sf_date(written).timestamp())


@pytest.mark.parametrize("value", ["", "@", "1700000000", "@1.5", "@²", "@ 17", "Tue, 1 Jan"])
def test_parse_sf_date_refuses_what_is_no_date_item(value: str) -> None:
    with pytest.raises(ValueError):
        parse_sf_date(value)
