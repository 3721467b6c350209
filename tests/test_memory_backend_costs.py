"""MemoryBackend.acquire with costs its index trick cannot carry (both backends)."""

from __future__ import annotations

from aimiddleware.ratelimit.backend import Backend, Hit
from aimiddleware.ratelimit.memory import MemoryBackend
from aimiddleware.ratelimit.redis import RedisBackend
from aimiddleware.storage import Storage


def _backend(storage: Storage) -> Backend:
    return MemoryBackend() if storage.is_memory else RedisBackend(storage, namespace="rvcost")


async def test_negative_cost_is_a_credit_on_both_backends(storage: Storage) -> None:
    backend = _backend(storage)
    assert (await backend.acquire("p", [Hit("tokens:60", 60_000, 10, 6)])).allowed
    credit = await backend.acquire("p", [Hit("tokens:60", 60_000, 10, -4)])
    assert credit.allowed  # (MemoryBackend read -4 as 2**126 - 4: refused)
    assert credit.states[0].curr == 2
    again = await backend.acquire("p", [Hit("tokens:60", 60_000, 10, 8)])
    assert again.allowed and again.states[0].curr == 10


async def test_cost_beyond_the_index_range_is_refused_not_an_index_error() -> None:
    backend = MemoryBackend()
    decision = await backend.acquire("p", [Hit("tokens:60", 60_000, 10, 1 << 130)])
    assert not decision.allowed and decision.failed == 0
    assert decision.states[0].curr == 0
