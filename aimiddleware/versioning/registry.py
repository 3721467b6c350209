"""``ModelRegistry``: dated snapshots, aliases that point at them, and their lifecycles.

A snapshot (``my-model-2026-06-01``) is a fixed behaviour: once published it is never
changed. An alias (``my-model``, ``latest``) is a movable pointer to a snapshot. Requests that
name a snapshot are pinned to it; repointing an alias only moves callers of the alias.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aimiddleware.errors import NotFound
from aimiddleware.versioning.lifecycle import (
    Clock,
    DateLike,
    Lifecycle,
    Status,
    as_utc,
    retired_error,
    utc_now,
)

__all__ = ["ModelRegistry", "ResolvedModel", "Snapshot"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}\Z")
_DATE_SUFFIX = re.compile(r"(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class Snapshot:
    """One dated, immutable model version and its lifecycle."""

    id: str
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    released_at: datetime | None = None
    owned_by: str = "system"

    @property
    def created(self) -> int:
        """Unix seconds for OpenAI's ``created``: the release date, else the id's date."""
        if self.released_at is not None:
            return int(self.released_at.timestamp())
        m = _DATE_SUFFIX.search(self.id)
        return int(as_utc(m.group(1)).timestamp()) if m else 0


@dataclass(frozen=True)
class ResolvedModel:
    """What the request asked for and what serves it."""

    requested: str
    snapshot: Snapshot
    via_alias: bool

    @property
    def version(self) -> str:
        return self.snapshot.id


class ModelRegistry:
    """Snapshots, aliases and lifecycles; the single source for the middleware, the
    ``deprecated`` decorator and the models route.

    ``clock`` returns the current aware UTC ``datetime`` (injectable for tests).
    The registry is configuration: build it the same way in every worker.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning an aware datetime")
        self.clock: Clock = clock or utc_now
        self._snapshots: dict[str, Snapshot] = {}
        self._aliases: dict[str, str] = {}
        # Bumped on every change, so per-name caches (the middleware's) know to refresh.
        self.generation = 0

    # -- configuration ----------------------------------------------------------------------

    def add_snapshot(
        self,
        snapshot_id: str,
        *,
        deprecated: DateLike | None = None,
        sunset: DateLike | None = None,
        replacement: str | None = None,
        retired: bool = False,
        released: DateLike | None = None,
        deprecation_link: str | None = None,
        sunset_link: str | None = None,
        successor_link: str | None = None,
        owned_by: str = "system",
        lifecycle: Lifecycle | None = None,
    ) -> Snapshot:
        """Publish a snapshot. Its id can never be reused as an alias, nor redefined."""
        _check_name(snapshot_id)
        if snapshot_id in self._snapshots:
            raise ValueError(f"snapshot {snapshot_id!r} already exists; snapshots are immutable")
        if snapshot_id in self._aliases:
            raise ValueError(f"{snapshot_id!r} is already an alias")
        if lifecycle is None:
            lifecycle = Lifecycle.of(
                deprecated=deprecated,
                sunset=sunset,
                replacement=replacement,
                retired=retired,
                deprecation_link=deprecation_link,
                sunset_link=sunset_link,
                successor_link=successor_link,
            )
        snap = Snapshot(
            snapshot_id,
            lifecycle,
            as_utc(released) if released is not None else None,
            owned_by,
        )
        self._snapshots[snapshot_id] = snap
        self.generation += 1
        return snap

    def deprecate(
        self,
        snapshot_id: str,
        *,
        deprecated: DateLike,
        sunset: DateLike | None = None,
        replacement: str | None = None,
        deprecation_link: str | None = None,
        sunset_link: str | None = None,
        successor_link: str | None = None,
    ) -> Snapshot:
        """Announce a snapshot's deprecation (its behaviour is untouched; only its dates)."""
        old = self.snapshot(snapshot_id)
        if replacement is not None and replacement not in self._snapshots:
            raise ValueError(f"replacement {replacement!r} is not a known snapshot")
        new = Snapshot(
            old.id,
            Lifecycle.of(
                deprecated=deprecated,
                sunset=sunset,
                replacement=replacement,
                retired=old.lifecycle.retired,  # new dates never bring a retired one back
                deprecation_link=deprecation_link,
                sunset_link=sunset_link,
                successor_link=successor_link,
            ),
            old.released_at,
            old.owned_by,
        )
        self._snapshots[snapshot_id] = new
        self.generation += 1
        return new

    def alias(self, name: str, snapshot_id: str) -> None:
        """Point alias ``name`` at a snapshot (creating or repointing it)."""
        _check_name(name)
        if name in self._snapshots:
            raise ValueError(f"{name!r} is a snapshot id; a snapshot can never be repointed")
        if snapshot_id not in self._snapshots:
            raise ValueError(f"alias target {snapshot_id!r} is not a known snapshot")
        self._aliases[name] = snapshot_id
        self.generation += 1

    # -- lookups ------------------------------------------------------------------------------

    def snapshot(self, snapshot_id: str) -> Snapshot:
        try:
            return self._snapshots[snapshot_id]
        except KeyError:
            raise KeyError(f"unknown snapshot {snapshot_id!r}") from None

    @property
    def snapshots(self) -> Mapping[str, Snapshot]:
        return dict(self._snapshots)

    @property
    def aliases(self) -> Mapping[str, str]:
        return dict(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._snapshots or name in self._aliases

    def status(self, snapshot_id: str, now: datetime | None = None) -> Status:
        return self.snapshot(snapshot_id).lifecycle.status(now or self.clock())

    def lookup(self, name: str) -> ResolvedModel:
        """Alias or snapshot to snapshot, without lifecycle checks; ``NotFound`` if unknown."""
        if name in self._snapshots:
            return ResolvedModel(name, self._snapshots[name], via_alias=False)
        target = self._aliases.get(name)
        if target is None:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise NotFound(f"The model {shown!r} does not exist.", param="model")
        return ResolvedModel(name, self._snapshots[target], via_alias=True)

    def resolve(self, name: str, now: datetime | None = None) -> ResolvedModel:
        """Like :meth:`lookup`, and a 410 ``ModelRetired`` after the snapshot's sunset."""
        resolved = self.lookup(name)
        lc = resolved.snapshot.lifecycle
        if lc.status(now or self.clock()) == "retired":
            raise retired_error("model", resolved.snapshot.id, lc, param="model")
        return resolved

    # -- the models route ---------------------------------------------------------------------

    def as_openai_list(self, now: datetime | None = None) -> dict[str, Any]:
        """OpenAI's ``GET /v1/models`` shape, plus lifecycle members.

        Snapshots carry ``status``, ``deprecation_date``, ``shutdown_date`` (YYYY-MM-DD or
        null, like OpenAI), ``replacement`` and the ``aliases`` that point at them; aliases
        are listed too, with ``alias_for``.
        """
        moment = now or self.clock()
        by_target: dict[str, list[str]] = {}
        for alias, target in sorted(self._aliases.items()):
            by_target.setdefault(target, []).append(alias)
        data: list[dict[str, Any]] = []
        for snap in sorted(self._snapshots.values(), key=lambda s: s.id):
            data.append(_entry(snap, snap.id, moment, aliases=by_target.get(snap.id, [])))
        for alias, target in sorted(self._aliases.items()):
            data.append(_entry(self._snapshots[target], alias, moment, alias_for=target))
        return {"object": "list", "data": data}


def _day(moment: datetime | None) -> str | None:
    return moment.date().isoformat() if moment is not None else None


def _entry(
    snap: Snapshot,
    model_id: str,
    now: datetime,
    *,
    aliases: list[str] | None = None,
    alias_for: str | None = None,
) -> dict[str, Any]:
    lc = snap.lifecycle
    entry: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": snap.created,
        "owned_by": snap.owned_by,
        "status": lc.status(now),
        "deprecation_date": _day(lc.deprecated_at),
        "shutdown_date": _day(lc.sunset_at),
        "replacement": lc.replacement,
    }
    if alias_for is not None:
        entry["alias_for"] = alias_for
    else:
        entry["aliases"] = aliases or []
    return entry


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid model name {name!r}")
