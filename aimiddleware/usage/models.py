"""Usage and envelope models: frozen, pure, no I/O."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, NonNegativeInt, model_validator

__all__ = ["Usage"]


class Usage(BaseModel):
    """Tokens one call used.

    ``input_tokens`` counts every billed input token, cache reads and writes included;
    ``cached_input_tokens`` and ``cache_creation_input_tokens`` are subsets of it, and
    ``reasoning_tokens`` a subset of ``output_tokens``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0
    total_tokens: NonNegativeInt = 0
    cached_input_tokens: NonNegativeInt = 0
    cache_creation_input_tokens: NonNegativeInt = 0
    reasoning_tokens: NonNegativeInt = 0

    @model_validator(mode="before")
    @classmethod
    def _fill_total(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("total_tokens"):
            data = dict(data)
            data["total_tokens"] = int(data.get("input_tokens") or 0) + int(
                data.get("output_tokens") or 0
            )
        return data
