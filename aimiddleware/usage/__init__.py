"""Usage: what a call used and cost, the envelope around its output, and the history.

Only the pure models are imported eagerly (``aimiddleware.context`` depends on them); the
other names load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from aimiddleware.usage.models import Envelope, Usage, sampling_params

__all__ = [
    "Completion",
    "Envelope",
    "Feedback",
    "Ledger",
    "MemoryLedger",
    "RedisLedger",
    "RequestRecord",
    "SQLiteLedger",
    "Usage",
    "UsageAccounting",
    "UsageAggregate",
    "UsageConfig",
    "UsageMiddleware",
    "UsageRecord",
    "UsageRoutes",
    "UsageSettings",
    "build_envelope",
    "envelope",
    "ledger_for",
    "sampling_params",
]

_LAZY = {
    "Completion": "envelope",
    "build_envelope": "envelope",
    "envelope": "envelope",
    "Feedback": "records",
    "Ledger": "ledger",
    "MemoryLedger": "ledger_memory",
    "RequestRecord": "records",
    "UsageAggregate": "records",
    "UsageRecord": "records",
    "RedisLedger": "ledger_redis",
    "SQLiteLedger": "ledger_sqlite",
    "UsageConfig": "config",
    "UsageMiddleware": "middleware",
    "UsageAccounting": "accounting",
    "UsageSettings": "accounting",
    "ledger_for": "accounting",
    "UsageRoutes": "routes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aimiddleware.usage' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aimiddleware.usage.{module}"), name)
