"""Load the reference app's ``config.toml``: models, prices, tiers and demo keys."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimiddleware import ModelRegistry, Policy, PriceTable

__all__ = ["Settings", "load_settings", "principal_of_key"]

SNAPSHOT_FIELDS = ("released", "deprecated", "sunset", "replacement", "deprecation_link",
                   "sunset_link", "successor_link")
POLICY_FIELDS = ("requests", "tokens", "input_tokens", "output_tokens", "cost", "concurrency",
                 "output_estimate")


@dataclass(frozen=True)
class Settings:
    registry: ModelRegistry
    prices: PriceTable
    tiers: dict[str, Policy]
    tier_of: dict[str, str]  # principal -> tier


def principal_of_key(key: str) -> str:
    """The principal the stack derives from ``Authorization: Bearer <key>`` (its default)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def load_settings(path: Path) -> Settings:
    data: dict[str, Any] = tomllib.loads(path.read_text())
    registry = ModelRegistry()
    models = data.get("models", {})
    for snapshot_id, spec in models.get("snapshots", {}).items():
        unknown = set(spec) - set(SNAPSHOT_FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)} in {snapshot_id}")
        registry.add_snapshot(snapshot_id, **spec)
    for alias, snapshot_id in models.get("aliases", {}).items():
        registry.alias(alias, snapshot_id)
    prices = PriceTable.from_dict(data.get("prices", {}))
    tiers: dict[str, Policy] = {}
    for name, spec in data.get("tiers", {}).items():
        unknown = set(spec) - set(POLICY_FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)} in tier {name}")
        tiers[name] = Policy(**spec)
    if "free" not in tiers:
        raise ValueError(f"{path}: a 'free' tier is required (the default)")
    tier_of = {principal_of_key(key): tier for key, tier in data.get("keys", {}).items()}
    for tier in tier_of.values():
        if tier not in tiers:
            raise ValueError(f"{path}: key mapped to unknown tier {tier!r}")
    return Settings(registry, prices, tiers, tier_of)
