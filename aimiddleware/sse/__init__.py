"""Server-sent events: spec-exact framing, the streaming response, dialects and resume.

- :mod:`aimiddleware.sse.events`: :class:`ServerSentEvent` and the pure framing functions.
- :mod:`aimiddleware.sse.response`: :class:`EventStreamResponse`.
- :mod:`aimiddleware.sse.dialects`: generic, OpenAI Chat Completions and Anthropic Messages.
- :mod:`aimiddleware.sse.replay`: :class:`ReplayBuffer` for ``Last-Event-ID`` resume.
"""

from aimiddleware.sse.dialects import (
    AnthropicDialect,
    Dialect,
    GenericDialect,
    OpenAIChatDialect,
    StreamSummary,
)
from aimiddleware.sse.events import (
    ServerSentEvent,
    encode_comment,
    encode_data,
    json_data,
    split_lines,
)
from aimiddleware.sse.replay import ReplayBuffer, parse_event_id
from aimiddleware.sse.response import EventStreamResponse, StreamResult

__all__ = [
    "AnthropicDialect",
    "Dialect",
    "EventStreamResponse",
    "GenericDialect",
    "OpenAIChatDialect",
    "ReplayBuffer",
    "ServerSentEvent",
    "StreamResult",
    "StreamSummary",
    "encode_comment",
    "encode_data",
    "json_data",
    "parse_event_id",
    "split_lines",
]
