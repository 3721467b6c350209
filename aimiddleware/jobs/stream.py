"""The job/batch SSE stream: replay from ``Last-Event-ID``, follow, heartbeat, final event.

Framed with :mod:`aimiddleware.sse` and sent by its ``EventStreamResponse`` (send
watchdog, disconnect handling, typed error events after the 200) in :class:`JobEventsDialect`:
the job's own final event (``job.completed`` ...) is the end of the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aimiddleware.jobs.models import Batch, Job
from aimiddleware.jobs.store import JobStore
from aimiddleware.sse import Dialect, encode_data, json_data
from aimiddleware.sse.dialects import StreamSummary

__all__ = ["JobEventsDialect", "event_stream"]


class JobEventsDialect(Dialect):
    """Events are pre-framed; no usage/``[DONE]`` trailer (the final job event ends it)."""

    name = "jobs"
    model_output = False  # (a job's usage is the job's: the request is not charged for it)

    def end(self, summary: StreamSummary) -> list[bytes]:
        return []

    def error(self, body: dict[str, Any], summary: StreamSummary) -> list[bytes]:
        return [encode_data(json_data(body), "error")]

_FINAL = {"completed", "failed", "cancelled", "expired"}


async def event_stream(
    store: JobStore,
    rec: Job | Batch,
    last: str | None,
    *,
    heartbeat_interval: float,
    reap: Callable[[Any], Awaitable[Job | Batch]],
) -> AsyncIterator[bytes]:
    """Replay the record's events after ``last``, follow new ones, end after the final one.

    After ``heartbeat_interval`` s without events a ``<kind>.heartbeat`` event (no id, so
    resuming is unaffected) tells the client the job is still working; ``reap`` turns a
    job whose worker died into a final event. A record that has ended with nothing logged
    after ``last`` (a client resuming at the final event) ends the stream.
    """
    prefix = rec.object
    ended = rec.terminal  # its final event is logged (or about to be: read once more)
    quiet_since = time.monotonic()
    while True:
        due = heartbeat_interval - (time.monotonic() - quiet_since)
        wait = min(1.0, max(0.01, due))
        events = await store.read_events(rec.principal, rec.id, last, wait=wait)
        for event_id, event, data in events:
            yield encode_data(data, event, event_id)
            last = event_id
            if event.removeprefix(prefix + ".") in _FINAL:
                return
        if events:
            quiet_since = time.monotonic()
        elif ended:
            return  # nothing after `last` in an ended record's log: nothing more will come
        elif time.monotonic() - quiet_since >= heartbeat_interval:
            # "still working" while a long step runs; no id, so resuming is unaffected
            raw = await store.get(rec.principal, rec.id)
            if raw is not None:
                current = await reap(type(rec).model_validate_json(raw))
                if current.terminal:
                    ended = True
                    continue  # its final event is in the log now
            status = json.loads(raw)["status"] if raw else "expired"
            yield encode_data(json.dumps({"status": status, "at": time.time()}),
                              f"{prefix}.heartbeat")
            quiet_since = time.monotonic()
            if raw is None:
                return
