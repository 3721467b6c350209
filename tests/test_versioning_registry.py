from __future__ import annotations

import pytest

from aimiddleware.errors import ModelRetired, NotFound
from aimiddleware.versioning import ModelRegistry
from tests.versioning_app import NEW, OLD, FakeClock, at, make_registry


def test_alias_resolves_to_snapshot_and_snapshot_is_pinned() -> None:
    registry = make_registry(FakeClock(at("2026-03-01")))
    alias = registry.resolve("my-model")
    assert (alias.requested, alias.version, alias.via_alias) == ("my-model", NEW, True)
    assert registry.resolve("latest").version == NEW
    pinned = registry.resolve(OLD)
    assert (pinned.requested, pinned.version, pinned.via_alias) == (OLD, OLD, False)


def test_repointing_an_alias_never_changes_a_pinned_snapshot() -> None:
    registry = make_registry(FakeClock(at("2026-03-01")))
    registry.add_snapshot("my-model-2026-09-01")
    registry.alias("my-model", "my-model-2026-09-01")
    assert registry.resolve("my-model").version == "my-model-2026-09-01"
    assert registry.resolve(NEW).version == NEW  # the pinned snapshot stays what it was
    assert registry.resolve("latest").version == NEW  # other aliases untouched
    with pytest.raises(ValueError, match="never be repointed"):
        registry.alias(NEW, "my-model-2026-09-01")
    with pytest.raises(ValueError, match="immutable"):
        registry.add_snapshot(NEW)
    with pytest.raises(ValueError, match="already an alias"):
        registry.add_snapshot("my-model")
    with pytest.raises(ValueError, match="not a known snapshot"):
        registry.alias("other", "nope-2020-01-01")


def test_unknown_model_is_404() -> None:
    registry = make_registry(FakeClock(at("2026-03-01")))
    with pytest.raises(NotFound) as exc:
        registry.resolve("gpt-17")
    assert exc.value.status == 404 and exc.value.param == "model"
    with pytest.raises(NotFound) as long:
        registry.resolve("x" * 10_000)
    assert len(long.value.detail) < 120  # the caller's input is not echoed unbounded


def test_410_after_sunset_with_injectable_clock() -> None:
    clock = FakeClock(at("2026-06-30T23:59:59"))
    registry = make_registry(clock)
    assert registry.resolve(OLD).version == OLD
    assert registry.status(OLD) == "deprecated"
    clock.now = at("2026-07-01")
    with pytest.raises(ModelRetired) as exc:
        registry.resolve(OLD)
    err = exc.value
    assert err.status == 410 and err.extra["replacement"] == NEW
    assert NEW in err.detail and "2026-07-01" in err.detail
    assert dict(err.headers)["sunset"] == "Wed, 01 Jul 2026 00:00:00 GMT"
    assert registry.resolve("my-model").version == NEW  # the alias keeps working


def test_deprecate_later_and_validation() -> None:
    registry = ModelRegistry(clock=FakeClock(at("2026-03-01")))
    registry.add_snapshot("m-2026-01-01")
    registry.add_snapshot("m-2026-03-01")
    assert registry.status("m-2026-01-01") == "active"
    registry.deprecate("m-2026-01-01", deprecated="2026-03-01", sunset="2026-06-01",
                       replacement="m-2026-03-01")
    assert registry.status("m-2026-01-01") == "deprecated"
    with pytest.raises(ValueError, match="Sunset"):
        registry.deprecate("m-2026-03-01", deprecated="2026-05-01", sunset="2026-04-01")
    with pytest.raises(ValueError, match="replacement"):
        registry.deprecate("m-2026-03-01", deprecated="2026-05-01", replacement="zzz")
    with pytest.raises(ValueError, match="invalid model name"):
        registry.add_snapshot("bad name")


def test_deprecate_keeps_a_retired_snapshot_retired() -> None:
    registry = ModelRegistry(clock=FakeClock(at("2026-03-01")))
    registry.add_snapshot("m-2026-01-01", retired=True)
    registry.deprecate("m-2026-01-01", deprecated="2026-03-01", sunset="2026-06-01")
    assert registry.status("m-2026-01-01") == "retired"


def test_openai_models_list_shape() -> None:
    registry = make_registry(FakeClock(at("2026-03-01")))
    listing = registry.as_openai_list()
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert set(by_id) == {OLD, NEW, "my-model", "latest"}
    old = by_id[OLD]
    assert old["object"] == "model" and old["owned_by"] == "system"
    assert old["created"] == int(at("2025-01-15").timestamp())
    assert (old["status"], old["deprecation_date"], old["shutdown_date"], old["replacement"]) == (
        "deprecated", "2026-01-01", "2026-07-01", NEW,
    )
    assert by_id[NEW]["shutdown_date"] is None and by_id[NEW]["status"] == "active"
    assert by_id[NEW]["aliases"] == ["latest", "my-model"]
    assert by_id["my-model"]["alias_for"] == NEW
    later = registry.as_openai_list(at("2026-08-01"))
    assert {m["id"]: m for m in later["data"]}[OLD]["status"] == "retired"
