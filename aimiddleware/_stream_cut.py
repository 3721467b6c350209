"""A foreign event stream cut by its time limit, its iterator raising or the server
cancelling it: ended with an error event where it can be.

An :class:`~aimiddleware.sse.response.EventStreamResponse` cut so writes its own error
event. Any other ``text/event-stream`` response (Starlette's ``StreamingResponse``,
sse-starlette's ``EventSourceResponse``, an upstream's stream passed on) could only be
aborted: the connection dropped mid-body. It can end with an error event instead when what
it sent so far ends at an event boundary (a blank line, or nothing yet): an SSE parser has
then dispatched every event it got, and ``event: error`` whose data is the problem body
(which carries the OpenAI-compatible ``error`` object: the ``openai`` and ``anthropic`` SDKs
raise on it) is one more whole event, not glued to half of one. Otherwise, or if the
stream is compressed, has a declared length or trailers, or has ended, the abort stays.

What was sent is watched for time-limited requests: by :class:`SentWatch`, the outermost
``send`` the cancellation layer puts on such a request, or by ``install()``'s stack itself,
which sends every head and body through its one wrapper and notes them there (no wrapper
more per message); and from its head for any foreign event stream, never for another
response: by the usage layer's ``watch_stream`` (the stack's wrapper, or a ``SentWatch`` on
the chained layer's send), which reads the head's media type anyway; without a usage layer,
by the stack's wrapper as it adds the layers' headers, or in the chained layers by a
``SentWatch`` the context layer puts on its send as it adds the request id (each asks
:func:`says_event_stream` only of a head no one watches yet, not an ``EventStreamResponse``'s).
Either is ``ctx.state[SENT]``: the cancellation layer asks it
for a writer when the deadline cuts a response that has started (:func:`error_writer`), the
error layer when an exception or the server's cancellation ends one, and calls that writer
as it calls an ``EventStreamResponse``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import anyio

from aimiddleware._encoding import content_coding
from aimiddleware._problem import problem_body
from aimiddleware.context import RequestContext
from aimiddleware.error_middleware import ERROR_SEND
from aimiddleware.errors import AIError
from aimiddleware.types import Message, Send

logger = logging.getLogger("aimiddleware")

SENT = "cancellation.sent"
"""``ctx.state`` key: what watches the request's response (a time-limited request, or a
foreign event stream the usage layer saw start), a :class:`SentWatch` or ``install()``'s
stack: its ``writer(ctx, seconds)``."""

START = b"\n\n"  # (the last bytes of a stream that sent nothing yet: as after a blank line)


def last_bytes(tail: bytes, body: bytes) -> bytes:
    """The last (up to 3) bytes sent, ``tail`` before and ``body`` now."""
    if len(body) >= 3:
        return bytes(body[-3:])
    return (tail + bytes(body))[-3:] if body else tail


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


def says_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Does a response head with these ``headers`` have the media type ``text/event-stream``?
    (Whether more can be added to it is :func:`is_plain_event_stream`'s, asked once it is
    cut.) Its first ``content-type`` decides; no other header is lowered or parsed."""
    for name, value in headers:
        if name == b"content-type" or (len(name) == 12 and name.lower() == b"content-type"):
            return bytes(value).split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


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
        self.tail = START

    async def __call__(self, message: Message) -> None:
        await self.send(message)
        kind = message["type"]
        if kind == "http.response.body":
            self.tail = last_bytes(self.tail, message.get("body", b""))
        elif kind == "http.response.start":
            self.head = message

    def writer(
        self, ctx: RequestContext, seconds: float
    ) -> Callable[[AIError], Awaitable[None]] | None:
        """:func:`error_writer` of what went out through this ``send``."""
        return error_writer(self.head, self.tail, self.send, ctx, seconds)


def stream_writer(
    ctx: RequestContext, seconds: float
) -> Callable[[AIError], Awaitable[None]] | None:
    """The started event stream's error writer: an ``EventStreamResponse``'s, else, for a
    watched one (``ctx.state[SENT]``), set now from what it sent (:func:`error_writer`;
    ``seconds``: how long writing may take); ``None``: it can only be aborted."""
    if ctx.stream_error_writer is None:
        watch = ctx.state.get(SENT)
        if watch is not None:
            ctx.stream_error_writer = watch.writer(ctx, seconds)
    return ctx.stream_error_writer


def error_writer(
    head: Message | None, tail: bytes, send: Send, ctx: RequestContext, seconds: float
) -> Callable[[AIError], Awaitable[None]] | None:
    """The ``stream_error_writer`` for a response cut by its deadline, whose ``head`` and
    last bytes ``tail`` were sent through ``send``, if it is a plain event stream that ends
    at an event boundary and has not ended (``None``: it can only be aborted). ``seconds``:
    how long writing the error event may take."""
    if (
        head is None
        or ctx.response_complete  # (ended already: an app's http function inside the stack)
        or ctx.method == "HEAD"
        or not is_plain_event_stream(head)
        or not at_event_boundary(tail)
    ):
        return None

    async def write_error(err: AIError) -> None:
        # (imported here: the sse package imports the cancellation layer)
        from aimiddleware.sse.events import encode_data, json_data

        frame = encode_data(json_data(problem_body(err, request_id=ctx.request_id)), "error")
        out = ctx.state.get(ERROR_SEND) or send
        with anyio.move_on_after(seconds) as scope:
            try:
                await out({"type": "http.response.body", "body": frame, "more_body": False})
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
