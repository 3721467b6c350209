"""The per-request runtime of an :class:`~aimiddleware.sse.response.EventStreamResponse`.

One :class:`StreamSender` (internal) per response being sent: the hot loop (frame,
optionally store for resume, send), the timer task (heartbeats after a silence, the
send-timeout watchdog), the disconnect watch, the end of the stream (usage event and end
marker, or an error event) and what goes into the request context.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio

from aimiddleware.cancellation import CANCEL_ON_DISCONNECT, DEADLINE, cleanup_scope
from aimiddleware.context import RequestContext, report_no_model_call
from aimiddleware.error_middleware import ERROR_SEND
from aimiddleware.errors import AIError, problem_body
from aimiddleware.sse.dialects import Dialect, StreamSummary
from aimiddleware.sse.events import ServerSentEvent, without_ids
from aimiddleware.sse.replay import parse_event_id
from aimiddleware.types import Receive, Scope, Send
from aimiddleware.usage.models import Usage, believed

if TYPE_CHECKING:
    from aimiddleware.sse.response import EventStreamResponse

__all__ = ["COMPLETED", "FAILED", "Pricer", "StreamResult"]

logger = logging.getLogger("aimiddleware")

COMPLETED = "sse.completed"
"""``ctx.state`` key set to ``True`` once a stream sent its normal end (not an error, not cut)."""
FAILED = "sse.failed"
"""``ctx.state`` key set to ``True`` when a stream ended with an error event (after its 200):
idempotency does not store it, so a retry runs again."""

Pricer = Callable[[str | None, Usage], Decimal | None]


@dataclass(frozen=True)
class StreamResult:
    """Yield this (usually last) to report usage / finish_reason / model; it is not sent.

    ``stop_sequence``: the stop sequence that ended the output, for dialects whose end
    names it (Anthropic's ``message_delta``, whose ``stop_reason`` is then ``stop_sequence``).
    """

    usage: Usage | None = None
    finish_reason: str | None = None
    model: str | None = None
    stop_sequence: str | None = None


class StreamSender:
    """The per-request state of one response being sent."""

    def __init__(
        self, resp: EventStreamResponse, scope: Scope, send: Send, ctx: RequestContext | None
    ) -> None:
        self.resp = resp
        self.scope = scope
        self.send = send
        self.ctx = ctx
        self.dialect = resp.dialect
        self.last = time.monotonic()
        self.sending = False
        self.hb_done: anyio.Event | None = None
        self.closed = False
        self.client_gone = False
        self.timed_out = False
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.stop_sequence: str | None = None
        self.model = resp.model
        self.seq = 0
        self.started = time.perf_counter() if ctx is None else ctx.started
        self.tg_scope: anyio.CancelScope | None = None
        self.send_scope: anyio.CancelScope | None = None  # a producer's send in progress
        self.principal = ctx.principal if ctx is not None else "anonymous"
        self.producer = False
        self.sid = ""

    # -- entry ---------------------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        resp, ctx = self.resp, self.ctx
        if ctx is not None:
            ctx.streaming = True
            ctx.stream_error_writer = self.write_error
            if self.model is None:
                self.model = ctx.model
        source: AsyncIterator[Any] = resp.iterator
        tail = False
        if resp.replay is not None:
            resumed = await self._resume_source()
            if resumed is False:
                return
            if resumed is not None and resumed is not True:
                tail, source = True, resumed
            else:
                self.sid = resp.stream_id or resp.replay.new_stream_id()
                self.producer = True
                if ctx is not None:
                    ctx.state[CANCEL_ON_DISCONNECT] = False
        try:
            await self.send({
                "type": "http.response.start", "status": resp.status_code,
                "headers": resp.raw_headers,
            })
        except BaseException:  # the client gone (OSError), a cancel: the source is closed too
            with cleanup_scope(resp.cleanup_timeout):
                await self._close_source(source)
            raise
        if self.scope.get("method") == "HEAD":
            if ctx is not None:
                report_no_model_call(ctx)  # (the source is closed unread)
            await self._close_source(source)
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            self.closed = True
            return
        try:
            async with anyio.create_task_group() as tg:
                self.tg_scope = tg.cancel_scope
                tg.start_soon(self._watch_disconnect, receive)
                if resp.heartbeat is not None or resp.send_timeout is not None:
                    tg.start_soon(self._timer)
                await self._pump(source, tail)
                tg.cancel_scope.cancel()
        finally:
            if not self.closed:
                # Disconnect, send timeout or outer cancellation: record what we know.
                self._record_context(self._cut_reason())
                with cleanup_scope(resp.cleanup_timeout):
                    await self._close_source(source)
                    if self.timed_out:
                        logger.warning("SSE send blocked > %ss: abandoned", resp.send_timeout)

    async def _resume_source(self) -> AsyncIterator[bytes] | bool | None:
        """A tail of the replay buffer for a ``Last-Event-ID`` reconnect (``False``: answered)."""
        replay = self.resp.replay
        assert replay is not None
        header = None
        for name, value in self.scope.get("headers", ()):
            if name == b"last-event-id":
                header = value.decode("utf-8", "replace")
        parsed = parse_event_id(header) if header else None
        if parsed is None:
            return None
        sid, after = parsed
        self.sid = sid
        if self.ctx is not None:
            # Whatever the answer (a replay, a 204 after the end, a 404), the model is not
            # called again: the replayed events' usage was the first request's.
            report_no_model_call(self.ctx)
        state = await replay.state(self.principal, sid, after)
        if state == "gone":
            from aimiddleware._asgi import send_problem
            from aimiddleware.errors import NotFound

            await send_problem(
                self.send,
                NotFound("The stream for this Last-Event-ID has expired or is unknown."),
                self.ctx.request_id if self.ctx else None,
            )
            await self._close_source(self.resp.iterator)
            self.closed = True
            return False
        if state == "complete":  # nothing after this id and the stream ended: stop reconnecting
            await self.send({"type": "http.response.start", "status": 204, "headers": []})
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            await self._close_source(self.resp.iterator)
            self.closed = True
            return False
        await self._close_source(self.resp.iterator)  # the model is not called again
        return replay.follow(self.principal, sid, after, idle_timeout=self.resp.resume_idle_timeout)

    # -- the hot loop --------------------------------------------------------------------

    async def _pump(self, source: AsyncIterator[Any], tail: bool) -> None:
        send = self.send
        dialect = self.dialect
        frame = dialect.frame
        observes = type(dialect).observe is not Dialect.observe
        replay = None if tail else self.resp.replay
        try:
            async for item in source:
                kind = type(item)
                if (kind is str or kind is dict) and not observes:
                    data = frame(item)
                elif kind is bytes:
                    data = item
                elif isinstance(item, ServerSentEvent):
                    data = item.encode()
                elif isinstance(item, Usage):
                    self.usage = believed(item)
                    continue
                elif isinstance(item, StreamResult):
                    self._take_result(item)
                    continue
                else:
                    if observes:
                        usage, finish = dialect.observe(item)
                        if usage is not None:
                            self.usage = usage
                        if finish is not None:
                            self.finish = finish
                    data = frame(item)
                if replay is not None:
                    data = await self._store(data)
                    # A producer whose client left still sends every frame down the chain
                    # (the server drops them): the idempotency layer records the whole
                    # answer, never one with a hole. Not to a client that stopped reading.
                    if self.timed_out:
                        continue
                elif self.client_gone:
                    continue
                if self.hb_done is not None:
                    await self.hb_done.wait()
                self.last = time.monotonic()
                self.sending = True
                try:
                    if replay is None:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    else:  # a producer: a send timeout ends this send, not the stream
                        with anyio.CancelScope() as self.send_scope:
                            await send(
                                {"type": "http.response.body", "body": data, "more_body": True}
                            )
                except OSError:  # ASGI >= 2.4 servers report a closed connection this way
                    self._client_left()
                    if replay is None:
                        break
                self.sending = False
        except Exception as exc:
            err = self.resp.mapper.map(exc)
            if not isinstance(exc, AIError):
                logger.error("event stream iterator failed", exc_info=exc)
            await self.write_error(err)
            return
        if self.client_gone and not self.producer:
            return  # nobody to tell; run() records the partial usage
        if self.ctx is not None:
            # Ended normally: idempotency may store it, also a producer's whose client left
            # (every frame went down the chain). Set before the end goes out, as the
            # recording decides on that message.
            self.ctx.state[COMPLETED] = True
        if tail:
            await self._finish([])
        else:
            summary = self._record_context("stop")
            await self._finish(self.dialect.end(summary))

    # -- end of stream -------------------------------------------------------------------

    def _cut_reason(self) -> str:
        """Why a stream was cut short: the request's time limit (a timeout tier) run out is
        ``timeout``; the client (gone, or not reading) or anything else (the server
        stopping) ``cancelled``."""
        ctx = self.ctx
        if ctx is None or self.client_gone or self.timed_out or ctx.disconnected:
            return "cancelled"
        deadline = ctx.state.get(DEADLINE)
        if deadline is not None and anyio.current_time() >= deadline:
            return "timeout"
        return "cancelled"

    def _take_result(self, item: StreamResult) -> None:
        if item.usage is not None:
            self.usage = believed(item.usage)
        if item.finish_reason is not None:
            self.finish = item.finish_reason
        if item.model is not None:
            self.model = item.model
        if item.stop_sequence is not None:
            self.stop_sequence = item.stop_sequence

    def _record_context(self, default: str) -> StreamSummary:
        ctx = self.ctx
        finish = self.finish or (ctx.raw_finish_reason if ctx is not None else None) or default
        usage = self.usage
        if usage is None and ctx is not None:
            usage = ctx.usage
        cost = ctx.estimated_cost if ctx is not None else None
        pricer = self.resp.pricer or (ctx.state.get("usage.pricer") if ctx is not None else None)
        if cost is None and pricer is not None and usage is not None:
            try:
                cost = pricer(self.model, usage)
            except Exception:  # pricing never breaks a stream
                logger.exception("pricing the stream's usage failed")
        if ctx is not None and self.dialect.model_output:
            if usage is not None:
                ctx.usage = usage
            else:
                # No usage known: the counts the dialect's own end must still write (an
                # Anthropic message_delta's output_tokens) are not usage for the stack.
                ctx.state["usage_reported"] = True
            ctx.raw_finish_reason = finish
            if self.model is not None and ctx.model is None:
                ctx.model = self.model
        return StreamSummary(
            usage=usage,
            finish_reason=finish,
            duration_ms=(time.perf_counter() - self.started) * 1000.0,
            request_id=ctx.request_id if ctx is not None else None,
            model=self.model,
            estimated_cost=cost,
            stop_sequence=self.stop_sequence,
        )

    async def write_error(self, err: AIError) -> None:
        """The context's ``stream_error_writer``: an error event in the dialect, then the end."""
        if self.closed:
            logger.warning("%s raised after the event stream had ended; not sent", err.code)
            return
        self.finish = "timeout" if err.code == "timeout" else "error"  # (a timeout tier's)
        if self.ctx is not None:
            self.ctx.state[FAILED] = True
        summary = self._record_context("error")
        body = problem_body(err, request_id=summary.request_id)
        await self._finish(self.dialect.error(body, summary))

    async def _finish(self, frames: list[bytes]) -> None:
        if self.closed:
            return
        if self.producer and self.resp.replay is not None:
            try:
                frames = [await self._store(f) for f in frames]
                await self.resp.replay.finish(self.principal, self.sid)
            except Exception:  # the live client still gets its end; a resume will 404
                logger.exception("recording the end of a resumable stream failed")
                self.producer = False
        if self.hb_done is not None:
            await self.hb_done.wait()
        self.closed = True
        if self.timed_out:  # (a producer that ran on): the client stopped reading long ago
            return
        self.last = time.monotonic()  # (the watchdog measures this send from now)
        self.sending = True
        limit = self.resp.send_timeout
        # Also bounded outside the timer task (an error written after the stream's own end).
        message = {"type": "http.response.body", "body": b"".join(frames), "more_body": False}
        with anyio.move_on_after(limit if limit is not None else float("inf")):
            try:
                try:
                    await self.send(message)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    # An error event written after the app ended, through an app-side
                    # middleware that relays by a memory stream closed with the app (an
                    # @app.middleware("http") function): sent by the error layer's send.
                    fallback = self.ctx.state.get(ERROR_SEND) if self.ctx is not None else None
                    if fallback is None:
                        raise
                    await fallback(message)
            except OSError:  # the client left as its end went out (ASGI >= 2.4)
                self._client_left()
        self.sending = False

    async def _store(self, data: bytes) -> bytes:
        replay = self.resp.replay
        assert replay is not None
        self.seq += 1
        # (an id of the item's own would replace ours: a resume from it would find nothing)
        data = f"id: {self.sid}:{self.seq}\n".encode() + without_ids(data)
        await replay.append(self.principal, self.sid, self.seq, data)
        return data

    async def _close_source(self, source: AsyncIterator[Any]) -> None:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                logger.exception("closing the event iterator failed")
        close = getattr(getattr(self.resp, "sync_iterator", None), "close", None)
        if close is not None:
            with contextlib.suppress(ValueError, RuntimeError):  # still running in its thread
                close()

    # -- background tasks ----------------------------------------------------------------

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_left()
                if not self.producer and self.tg_scope is not None:
                    self.tg_scope.cancel()
                return

    def _client_left(self) -> None:
        self.client_gone = True
        if self.ctx is not None:
            self.ctx.disconnected = True

    async def _timer(self) -> None:
        beat = self.resp.heartbeat
        limit = self.resp.send_timeout
        while not self.client_gone:
            now = time.monotonic()
            if self.sending:
                if limit is not None and now - self.last >= limit:
                    self._abandon()
                    return
                wake = self.last + limit if limit is not None else now + (beat or 1.0)
            elif beat is not None:
                due = self.last + beat
                if now >= due:
                    await self._beat(limit)
                    continue
                wake = due if limit is None else min(due, now + limit)
            else:
                wake = now + (limit or 1.0)
            await anyio.sleep(max(wake - now, 0.0))

    async def _beat(self, limit: float | None) -> None:
        done = self.hb_done = anyio.Event()
        self.last = time.monotonic()
        try:
            with anyio.move_on_after(limit if limit is not None else float("inf")) as scope:
                beat = self.dialect.heartbeat
                await self.send({"type": "http.response.body", "body": beat, "more_body": True})
            if scope.cancelled_caught:
                self._abandon()
        except OSError:  # the connection closed (ASGI >= 2.4): as an http.disconnect
            self._client_left()
            if not self.producer and self.tg_scope is not None:
                self.tg_scope.cancel()
        finally:
            self.hb_done = None
            done.set()

    def _abandon(self) -> None:
        self.timed_out = True
        self.client_gone = True
        if self.producer:  # with replay= the producer runs to its end: only the send goes
            if self.send_scope is not None:
                self.send_scope.cancel()
            return
        if self.tg_scope is not None:
            self.tg_scope.cancel()
