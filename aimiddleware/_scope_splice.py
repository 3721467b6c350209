"""Splicing an anyio cancel scope in around a running task, as if entered when it started.

``CancellationMiddleware`` enters no cancel scope for a request without a time limit (anyio's
costs ~6 µs per request in the stack): it notes the task, the task's scope and its cancel
count when the app starts, and only if the app must be cancelled does :func:`_splice` build
the scope that ``with`` would have entered then. This writes anyio's private asyncio state,
so it is used only with the exact layout it was written against, checked at import
(:func:`_splice_supported`); with any other anyio ``_CAN_SPLICE`` is false and a scope is
entered per request instead.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any
from weakref import WeakKeyDictionary

import anyio

# The exact layout _splice was written against (anyio 4.16): a scope with one more slot
# or a task state with one more field may hold state that ``__enter__`` sets and _splice
# would not, so any difference in either turns splicing off.
_SCOPE_SLOTS = frozenset(
    {"_active", "_cancel_called", "_cancel_handle", "_cancel_reason", "_cancelled_caught"}
    | {"_cancelling_at_enter", "_child_scopes", "_deadline", "_host_task", "_parent_scope"}
    | {"_pending_uncancellations", "_shield", "_tasks", "_timeout_handle"}
)
_STATE_SLOTS = frozenset({"__weakref__", "cancel_scope", "parent_id"})


def _splice_supported(scope_cls: type, state_cls: type, states: object) -> bool:
    """Can a scope of ``scope_cls`` be spliced in (see :func:`_splice`)?"""
    return (
        frozenset(getattr(scope_cls, "__slots__", ())) == _SCOPE_SLOTS
        and frozenset(getattr(state_cls, "__slots__", ())) == _STATE_SLOTS
        and isinstance(states, WeakKeyDictionary)
    )


try:  # anyio's asyncio scope internals, for a scope spliced in only when needed (below)
    from anyio._backends._asyncio import CancelScope as _AsyncioScope
    from anyio._backends._asyncio import TaskState as _TaskState
    from anyio._backends._asyncio import _task_states as _task_states
except ImportError:  # another anyio: enter a scope per request
    _CAN_SPLICE = False
    _SWALLOWS_NATIVE_CANCEL = False
    _task_states = WeakKeyDictionary()  # (an empty stand-in: nothing is spliced)
else:
    _CAN_SPLICE = _splice_supported(_AsyncioScope, _TaskState, _task_states)
    # anyio before 4.16 (whose scope has no ``_cancelling_at_enter``) lets a cancelled scope
    # swallow a ``Task.cancel()`` from outside (a server shutting down) that lands meanwhile:
    # folded into the scope's own CancelledError, or during the app's shielded cleanup. The
    # entered scope's exit is then checked against the task's count (``Task.cancelling``).
    _SWALLOWS_NATIVE_CANCEL = "_cancelling_at_enter" not in getattr(
        _AsyncioScope, "__slots__", ()
    )

    class _SplicedScope(_AsyncioScope):
        """A spliced scope, with the order its request started in (nested layers)."""

        __slots__ = ("order",)
        order: int


_splice_order = itertools.count()  # serve() start order, so nested layers splice in order


def _splice(task: asyncio.Task[Any], base: Any, cancelling: int, order: int) -> anyio.CancelScope:
    """An anyio cancel scope around the running app, exactly as if ``with`` had entered it
    when the app started (in ``task``, inside ``base``, the task's scope then).

    What ``CancelScope.__enter__`` would have set then is set now: the scope is the parent
    of the app's outermost scope (or holds the task if the app is in none), so anyio
    itself delivers the cancellation, skips shielded scopes, keeps cancelling until the app
    leaves, and ``serve`` exits it as a ``with`` would. A request that is never cancelled
    (nearly all) pays for no scope at all.

    Another layer's spliced scope in the way is inside ours if its request started later
    (``order``), else ours is inside it: it stands for a scope entered before ours.
    """
    scope: Any = _SplicedScope()
    scope.order = order
    scope._host_task = task
    scope._cancelling_at_enter = cancelling
    scope._active = True
    state = _task_states.get(task)
    parent = base
    inner: Any = None  # the outermost scope the app entered (after ``order``), if any
    node: Any = state.cancel_scope if state is not None else None
    while node is not base:
        if isinstance(node, _SplicedScope) and node.order < order:
            parent = node  # an outer layer's: entered (as if) before ours
            break
        inner, node = node, node._parent_scope
    scope._parent_scope = parent
    if inner is None:  # the app is in no scope of its own: the task is in ours
        if state is None:
            _task_states[task] = _TaskState(None, scope)
        else:
            state.cancel_scope = scope
        scope._tasks.add(task)
        if parent is not None:
            parent._tasks.discard(task)
    else:  # the app's outermost scope moves into ours
        inner._parent_scope = scope
        scope._child_scopes.add(inner)
        if parent is not None:
            parent._child_scopes.discard(inner)
    if parent is not None:
        parent._child_scopes.add(scope)
    return scope  # type: ignore[no-any-return]
