"""Pydantic models rebuilt from values already checked, and their fields sets as bit masks.

The in-process stores keep records as tuples of plain values (which the garbage collector
does not track) and rebuild the model when one is read. :func:`trusted` builds it without
validation; :func:`field_masks` numbers every subset of a model's fields, so a record keeps
which fields were explicitly set as one int (a set would be tracked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = ["field_masks", "trusted"]

_M = TypeVar("_M", bound=BaseModel)

_set = object.__setattr__
new_model = object.__new__


def _slot_setter(name: str) -> Callable[[Any, Any], None]:
    """BaseModel's slot ``name`` set through its descriptor: cheaper than object.__setattr__'s
    lookup (object.__setattr__ itself should a pydantic release drop the slot)."""
    slot = BaseModel.__dict__.get(name)
    if slot is not None and hasattr(slot, "__set__"):
        return slot.__set__  # type: ignore[no-any-return]
    return lambda obj, value: _set(obj, name, value)


set_dict = _slot_setter("__dict__")
set_fields_set = _slot_setter("__pydantic_fields_set__")
set_extra = _slot_setter("__pydantic_extra__")
set_private = _slot_setter("__pydantic_private__")


def trusted(cls: type[_M], values: dict[str, Any], fields_set: frozenset[str]) -> _M:
    """An instance of the pydantic model ``cls`` from ``values`` that are already valid.

    What ``model_construct`` does, without its per-call field walk: ``values`` must hold
    every field of ``cls`` with a value of its type (the caller guarantees it), and
    ``fields_set`` is what validation would have reported as explicitly set. No validators
    run: use it only on the per-request path, for values built from checked ints/strings.
    """
    obj = new_model(cls)
    set_dict(obj, values)
    set_fields_set(obj, set(fields_set))
    set_extra(obj, None)
    set_private(obj, None)
    return obj


def field_masks(
    fields: Sequence[str],
) -> tuple[tuple[frozenset[str], ...], dict[frozenset[str], int]]:
    """Every subset of ``fields`` by its bit mask (bit i: ``fields[i]``), and the reverse."""
    sets = tuple(
        frozenset(f for bit, f in enumerate(fields) if mask >> bit & 1)
        for mask in range(1 << len(fields))
    )
    return sets, {subset: mask for mask, subset in enumerate(sets)}
