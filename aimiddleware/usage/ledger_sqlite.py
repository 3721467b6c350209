"""``SQLiteLedger``: the usage ledger in a SQLite file (durable, one host).

The stdlib ``sqlite3`` driver runs in a worker thread (``anyio.to_thread``) behind one lock
per ledger, so the event loop never waits on disk. WAL mode and ``BEGIN IMMEDIATE`` keep
several processes on one file consistent.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import date
from pathlib import Path
from typing import Any

import anyio.to_thread

from aimiddleware.usage.ledger import Ledger
from aimiddleware.usage.records import (
    Feedback,
    RequestRecord,
    UsageAggregate,
    UsageRecord,
    _day_range,
    aggregate_from_counters,
    counters_for,
)

__all__ = ["SQLiteLedger"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_counters (
  principal TEXT NOT NULL, day TEXT NOT NULL, model TEXT NOT NULL,
  field TEXT NOT NULL, value INTEGER NOT NULL,
  PRIMARY KEY (principal, day, model, field));
CREATE TABLE IF NOT EXISTS usage_requests (
  principal TEXT NOT NULL, request_id TEXT NOT NULL, data TEXT NOT NULL,
  feedback TEXT, rating INTEGER, PRIMARY KEY (principal, request_id));
CREATE TABLE IF NOT EXISTS usage_seen (record_id TEXT PRIMARY KEY);
"""

_UPSERT = (
    "INSERT INTO usage_counters VALUES (?, ?, ?, ?, ?) ON CONFLICT (principal, day, model, field)"
    " DO UPDATE SET value = value + excluded.value"
)


class SQLiteLedger(Ledger):
    """``path``: a database file (created if missing) or ``":memory:"``."""

    def __init__(self, path: str | Path, *, write_timeout: float = 5.0) -> None:
        super().__init__(write_timeout=write_timeout)
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(self._connect(), *args)

        return await anyio.to_thread.run_sync(locked)

    def transient(self, exc: Exception) -> bool:
        # "database is locked", a full or unavailable disk: worth a retry
        return super().transient(exc) or isinstance(exc, sqlite3.OperationalError)

    async def _write(self, rec: UsageRecord) -> None:
        await self._run(_write, rec)

    async def query(
        self,
        principal: str,
        *,
        start: date | None = None,
        end: date | None = None,
        model: str | None = None,
    ) -> list[UsageAggregate]:
        lo, hi = _day_range(start, end)
        rows = await self._run(_select, principal, lo, hi, model)
        grouped: dict[tuple[str, str], dict[str, int]] = {}
        for day, mod, name, value in rows:
            grouped.setdefault((day, mod), {})[name] = value
        return [aggregate_from_counters(d, m, c) for (d, m), c in sorted(grouped.items())]

    async def get_request(self, principal: str, request_id: str) -> RequestRecord | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT data, feedback FROM usage_requests WHERE principal=? AND request_id=?",
                (principal, request_id),
            ).fetchone()
        )
        if row is None:
            return None
        return RequestRecord(
            record=UsageRecord.model_validate_json(row[0]),
            feedback=Feedback.model_validate_json(row[1]) if row[1] else None,
        )

    async def add_feedback(self, principal: str, feedback: Feedback) -> bool:
        return bool(await self._run(_feedback, principal, feedback))

    async def aclose(self) -> None:
        await super().aclose()
        if self._conn is not None:
            await self._run(lambda c: c.close())
            self._conn = None


def _write(conn: sqlite3.Connection, rec: UsageRecord) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute("INSERT OR IGNORE INTO usage_seen VALUES (?)", (rec.record_id,))
        if cur.rowcount == 1:
            where = (rec.principal, rec.day, rec.model_key)
            rows = [(*where, k, v) for k, v in counters_for(rec).items()]
            conn.executemany(_UPSERT, rows)
            conn.execute(
                "INSERT OR REPLACE INTO usage_requests VALUES (?, ?, ?, NULL, NULL)",
                (rec.principal, rec.request_id, rec.model_dump_json()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _select(
    conn: sqlite3.Connection, principal: str, lo: str, hi: str, model: str | None
) -> list[tuple[str, str, str, int]]:
    sql = (
        "SELECT day, model, field, value FROM usage_counters"
        " WHERE principal=? AND day BETWEEN ? AND ?"
    )
    params: list[Any] = [principal, lo, hi]
    if model is not None:
        sql += " AND model=?"
        params.append(model)
    return list(conn.execute(sql, params).fetchall())


def _feedback(conn: sqlite3.Connection, principal: str, feedback: Feedback) -> bool:
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute(
            "SELECT data, rating FROM usage_requests WHERE principal=? AND request_id=?",
            (principal, feedback.request_id),
        ).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            return False
        rec = UsageRecord.model_validate_json(row[0])
        old = row[1]
        incs = [("rating_sum", feedback.rating - (old or 0))]
        if old is None:
            incs.append(("feedback_count", 1))
        conn.executemany(
            _UPSERT, [(principal, rec.day, rec.model_key, k, v) for k, v in incs]
        )
        conn.execute(
            "UPDATE usage_requests SET feedback=?, rating=? WHERE principal=? AND request_id=?",
            (feedback.model_dump_json(), feedback.rating, principal, feedback.request_id),
        )
        conn.execute("COMMIT")
        return True
    except BaseException:
        conn.execute("ROLLBACK")
        raise
