"""``UsageConfig``: the usage layer's options for :func:`aimiddleware.install`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aimiddleware.pricing import PriceTable
from aimiddleware.storage import Storage
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.accounting import check_options
from aimiddleware.usage.ledger import Ledger

__all__ = ["UsageConfig"]


@dataclass
class UsageConfig:
    """``ledger=None`` uses the stack's storage (memory, or Redis shared by workers);
    pass a :class:`~aimiddleware.usage.ledger_sqlite.SQLiteLedger` for a durable file."""

    prices: PriceTable | None = None
    ledger: Ledger | None = None
    counter: TokenCounter | None = None
    record: bool = True
    max_json_body: int = 1024 * 1024
    header_prefix: str = "x-usage-"

    def __post_init__(self) -> None:
        # Checked here, not first when the layer is built: Starlette builds it on the first
        # ASGI call, where a failing lifespan is taken for "lifespan unsupported".
        check_options(self.prices, self.ledger, self.max_json_body, self.header_prefix)

    def middleware_options(self, storage: Storage) -> dict[str, Any]:
        return {
            "prices": self.prices,
            "ledger": self.ledger,
            "storage": storage,
            "counter": self.counter,
            "record": self.record,
            "max_json_body": self.max_json_body,
            "header_prefix": self.header_prefix,
        }
