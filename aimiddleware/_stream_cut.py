"""A foreign event stream cut by its time limit: ended with an error event where it can be.

An :class:`~aimiddleware.sse.response.EventStreamResponse` cut by a timeout tier writes its
own error event. Any other ``text/event-stream`` response (Starlette's ``StreamingResponse``,
sse-starlette's ``EventSourceResponse``, an upstream's stream passed on) could only be
aborted: the connection dropped mid-body. It can end with an error event instead when what
it sent so far ends at an event boundary (a blank line, or nothing yet): an SSE parser has
then dispatched every event it got, and ``event: error`` whose data is the problem body
(which carries the OpenAI-compatible ``error`` object: the ``openai`` and ``anthropic`` SDKs
raise on it) is one more whole event, not glued to half of one. Otherwise, or if the
stream is compressed, has a declared length or trailers, the abort stays.

:class:`SentWatch` is the ``send`` of a time-limited request (only those: ``install()``'s
stack and the cancellation layer put it outermost), keeping the response head and the last
bytes sent; the cancellation layer asks it for a writer when the deadline cuts a response
that has started (:meth:`SentWatch.writer`), and the error layer calls that writer as it
calls an ``EventStreamResponse``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from aimiddleware._encoding import content_coding
from aimiddleware._problem import problem_body
from aimiddleware.context import RequestContext
from aimiddleware.error_middleware import ERROR_SEND
from aimiddleware.errors import AIError
from aimiddleware.types import Message, Send

logger = logging.getLogger("aimiddleware")

SENT = "cancellation.sent"
"""``ctx.state`` key: the request's :class:`SentWatch` (time-limited requests only)."""

_START = b"\n\n"  # (nothing sent yet: as after a blank line)


def at_event_boundary(tail: bytes) -> bool:
    """Do the bytes of an event stream whose last (up to 3) bytes are ``tail`` end with a
    blank line? Lines end with CRLF, LF or a lone CR; the line ending last must follow
    another line ending directly. (A trailing CR is a line ending whatever comes next: an
    LF after it would belong to the same one, and an error event starts with a letter.)"""
    if tail.endswith(b"\r\n"):
        before = tail[-3:-2]
    elif tail.endswith((b"\n", b"\r")):
        before = tail[-2:-1]
    else:
        return False
    return before == b"\n" or before == b"\r"


def is_plain_event_stream(head: Message) -> bool:
    """Is this response head an event stream that more bytes can be added to: no content
    coding, no declared length, no trailers?"""
    if head.get("trailers"):
        return False
    event_stream = False
    for name, value in head.get("headers", ()):
        name = bytes(name).lower()
        if name == b"content-type":
            media_type = bytes(value).split(b";", 1)[0].strip().lower()
            event_stream = media_type == b"text/event-stream"
        elif name == b"content-length" or (
            name == b"content-encoding" and content_coding(bytes(value))
        ):
            return False
    return event_stream


class SentWatch:
    """A ``send`` that keeps the response head and the last bytes sent (after each send
    returned: a body a cancelled send never wrote is not counted)."""

    __slots__ = ("head", "send", "tail")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.head: Message | None = None
        self.tail = _START

    async def __call__(self, message: Message) -> None:
        await self.send(message)
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body", b"")
            if len(body) >= 3:
                self.tail = bytes(body[-3:])
            elif body:
                self.tail = (self.tail + bytes(body))[-3:]
        elif kind == "http.response.start":
            self.head = message

    def writer(
        self, ctx: RequestContext, seconds: float
    ) -> Callable[[AIError], Awaitable[None]] | None:
        """The ``stream_error_writer`` for a response cut by its deadline, if it is a plain
        event stream that ends at an event boundary (``None``: it can only be aborted).
        ``seconds``: how long writing the error event may take."""
        head = self.head
        if (
            head is None
            or ctx.method == "HEAD"
            or not is_plain_event_stream(head)
            or not at_event_boundary(self.tail)
        ):
            return None

        async def write_error(err: AIError) -> None:
            # (imported here: the sse package imports the cancellation layer)
            from aimiddleware.sse.events import encode_data, json_data

            frame = encode_data(json_data(problem_body(err, request_id=ctx.request_id)), "error")
            send = ctx.state.get(ERROR_SEND) or self.send
            with anyio.move_on_after(seconds) as scope:
                try:
                    await send({"type": "http.response.body", "body": frame, "more_body": False})
                except OSError:  # the client left meanwhile (ASGI >= 2.4): nobody to tell
                    ctx.disconnected = True
                    return
            if scope.cancelled_caught:  # a client that stopped reading: the abort after all
                logger.error(
                    "%s: the event stream's error event could not be sent in %gs; closing "
                    "the connection [request_id=%s]", err.code, seconds, ctx.request_id,
                )
                raise err

        return write_error
