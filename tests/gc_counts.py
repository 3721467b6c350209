"""How many objects a store leaves for the garbage collector to walk, per entry.

A full collection walks every tracked object (a pause for every request in flight), and
CPython runs one each time the long-lived tracked objects have grown by 25%: an in-process
store must keep its entries in forms the collector untracks (tuples of text, bytes and
numbers; dicts of those), so that the count does not grow with the number of entries.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any


def tracked_now() -> int:
    gc.collect()
    gc.collect()  # (a tuple in a tuple is untracked one collection after its content)
    return len(gc.get_objects())


def tracked_per_entry(fill: Callable[[int], Any], small: int = 500, large: int = 2_500) -> float:
    """Tracked objects that each entry past the first ``small`` adds: ``fill(n)`` builds a
    store of ``n`` entries (returned, so that it is alive while counted)."""
    counts = []
    for n in (small, large):
        before = tracked_now()
        kept = fill(n)
        counts.append(tracked_now() - before)
        del kept
    return (counts[1] - counts[0]) / (large - small)
