"""Stream dialects: how deltas, the final usage, errors and the end look on the wire.

A dialect turns what an endpoint yields into frames (``bytes``, one event each) and writes
the end of the stream. Pure: no I/O. Create one per response (it keeps per-stream state,
such as whether a content block is open).

- :class:`GenericDialect`: ``event: delta`` (``{"text": ...}``), ``event: usage``,
  ``event: error`` (the taxonomy body), ``event: done`` (``data: [DONE]``).
- :class:`OpenAIChatDialect`: Chat Completions chunks (``data:`` only), the usage chunk with
  empty ``choices`` when ``include_usage``, ``data: [DONE]``; errors as
  ``data: {"error": ...}`` (the OpenAI SDK raises ``APIError`` on it).
- :class:`AnthropicDialect`: Messages events (``message_start``, ``content_block_*``,
  ``message_delta`` with usage and ``stop_reason``, ``message_stop``), ``ping`` heartbeats,
  ``event: error``.

Dict items are passed through as the dialect's native payload (a whole OpenAI chunk, an
Anthropic event); ``str`` items are text deltas.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aimiddleware.sse.events import ServerSentEvent, _check_field, encode_data, json_data
from aimiddleware.usage.models import Usage, closed

__all__ = [
    "AnthropicDialect",
    "Dialect",
    "GenericDialect",
    "OpenAIChatDialect",
    "StreamSummary",
]


@dataclass(frozen=True)
class StreamSummary:
    """What the end of a stream reports (also written into the request context)."""

    usage: Usage | None
    finish_reason: str | None
    duration_ms: float
    request_id: str | None
    model: str | None = None
    estimated_cost: Decimal | None = None
    #: The stop sequence that ended the output, if the endpoint reported one.
    stop_sequence: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "usage": self.usage.model_dump() if self.usage is not None else None,
            "estimated_cost": str(self.estimated_cost) if self.estimated_cost is not None else None,
            "finish_reason": self.finish_reason,
            "model": self.model,
            "request_duration_ms": round(self.duration_ms, 3),
            "request_id": self.request_id,
        }


class Dialect:
    """Base and generic behaviour. Override the methods to write another wire format."""

    name = "generic"
    heartbeat: bytes = b": ping\n\n"
    #: A model's output: its end reports the usage and finish reason to the request context
    #: (the usage layer records them). ``False`` for other streams (a job's events).
    model_output = True

    def frame(self, item: Any) -> bytes:
        """Frame one item yielded by the endpoint (str = text delta, dict = native event)."""
        if isinstance(item, str):
            return b'event: delta\ndata: {"text":' + json_data(item).encode() + b"}\n\n"
        if isinstance(item, dict):
            data = item.get("data")
            if len(item) == 1 and type(data) is str:  # the common {"data": "..."}
                return encode_data(data)
            return ServerSentEvent.from_dict(item).encode()
        raise TypeError(f"cannot frame a {type(item).__name__} as a server-sent event")

    def observe(self, item: Any) -> tuple[Usage | None, str | None]:
        """Usage and raw finish_reason carried by a native item (for pass-through streams)."""
        return None, None

    def end(self, summary: StreamSummary) -> list[bytes]:
        """The final usage event and the end-of-stream marker."""
        return [encode_data(json_data(summary.as_dict()), "usage"), encode_data("[DONE]", "done")]

    def error(self, body: dict[str, Any], summary: StreamSummary) -> list[bytes]:
        """An error after the 200 (``body`` is the taxonomy's problem body), then the end."""
        return [
            encode_data(json_data(summary.as_dict()), "usage"),
            encode_data(json_data(body), "error"),
            encode_data("[DONE]", "done"),
        ]


GenericDialect = Dialect


def _openai_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


_TEMPLATE_CHOICE = {
    "index": 0, "delta": {"content": "@@aimw-delta@@"}, "logprobs": None, "finish_reason": None
}


class OpenAIChatDialect(Dialect):
    """OpenAI Chat Completions streaming. ``include_usage`` mirrors ``stream_options``."""

    name = "openai"

    def __init__(
        self,
        model: str = "unknown",
        *,
        include_usage: bool = False,
        id: str | None = None,
        created: int | None = None,
        system_fingerprint: str | None = None,
    ) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = id or "chatcmpl-" + secrets.token_hex(12)
        self.created = created if created is not None else int(time.time())
        self.fingerprint = system_fingerprint
        self._role_sent = False
        self._finished = False
        self._usage_sent = False  # the stream passed its own usage chunk through
        self._delta_head = self._delta_tail = b""

    @classmethod
    def for_request(cls, body: Any, **kwargs: Any) -> OpenAIChatDialect:
        """Read ``model`` and ``stream_options.include_usage`` from a request body."""
        body = body if isinstance(body, dict) else {}
        options = body.get("stream_options") or {}
        return cls(
            str(body.get("model") or "unknown"),
            # exactly true, as OpenAI and the model sources read it ("yes" is not true)
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            **kwargs,
        )

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return b"data: " + json_data(chunk).encode() + b"\n\n"

    def frame(self, item: Any) -> bytes:
        if isinstance(item, str):
            if self._delta_head:  # same bytes as _chunk(), without building the dict each time
                return self._delta_head + json_data(item).encode() + self._delta_tail
            if self._role_sent:
                delta: dict[str, Any] = {"content": item}
            else:
                self._role_sent = True
                template = self._chunk([_TEMPLATE_CHOICE])
                if template.count(b'"@@aimw-delta@@"') == 1:
                    head, _, tail = template.partition(b'"@@aimw-delta@@"')
                    self._delta_head, self._delta_tail = head, tail
                delta = {"role": "assistant", "content": item}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            return self._chunk([choice])
        if isinstance(item, dict):
            return b"data: " + json_data(item).encode() + b"\n\n"
        return super().frame(item)

    def observe(self, item: Any) -> tuple[Usage | None, str | None]:
        if not isinstance(item, dict):
            return None, None
        usage = None
        raw = item.get("usage")
        if isinstance(raw, dict):
            self._usage_sent = True
            usage = Usage.from_openai_chat(raw)  # (junk counts as 0, as in any response)
        finish = None
        choices = item.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
                self._finished = True
        return usage, finish

    def end(self, summary: StreamSummary) -> list[bytes]:
        frames = []
        if not self._finished:
            choice = {"index": 0, "delta": {}, "logprobs": None,
                      "finish_reason": summary.finish_reason or "stop"}
            frames.append(self._chunk([choice]))
        if self.include_usage and summary.usage is not None and not self._usage_sent:
            frames.append(self._chunk([], usage=_openai_usage(summary.usage)))
        frames.append(b"data: [DONE]\n\n")
        return frames

    def error(self, body: dict[str, Any], summary: StreamSummary) -> list[bytes]:
        # The problem body already has an OpenAI ``error`` object; the SDK raises on it.
        return [b"data: " + json_data(body).encode() + b"\n\n", b"data: [DONE]\n\n"]


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# Normalized reasons as Anthropic's stop_reason (a stream whose endpoint gave none ends with
# "stop"); Anthropic's own values pass as they are.
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def _anthropic_stop(summary: StreamSummary) -> dict[str, str | None]:
    """``message_delta``'s ``delta``: ``stop_sequence`` is named exactly when the output
    ended on one, and then the ``stop_reason`` is ``"stop_sequence"``."""
    reason = summary.finish_reason
    stop = "end_turn" if reason is None else _ANTHROPIC_STOP.get(reason, reason)
    sequence = summary.stop_sequence
    if sequence is not None and stop in ("end_turn", "stop_sequence"):
        return {"stop_reason": "stop_sequence", "stop_sequence": sequence}
    return {"stop_reason": stop, "stop_sequence": None}


class AnthropicDialect(Dialect):
    """Anthropic Messages streaming: named events whose ``event`` equals the JSON ``type``."""

    name = "anthropic"
    heartbeat = b'event: ping\ndata: {"type":"ping"}\n\n'

    def __init__(self, model: str = "unknown", *, id: str | None = None,
                 input_tokens: int = 0) -> None:
        self.model = model
        self.id = id or "msg_" + secrets.token_hex(12)
        self.input_tokens = input_tokens
        self._started = False
        self._block_open = False
        self._stopped = False
        self._opening: Usage | None = None

    @staticmethod
    def _event(payload: dict[str, Any]) -> bytes:
        return f"event: {payload['type']}\ndata: {json_data(payload)}\n\n".encode()

    def _start(self) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1},
        }
        return self._event({"type": "message_start", "message": message})

    def frame(self, item: Any) -> bytes:
        if isinstance(item, str):
            out = b"" if self._started else self._start()
            if not self._block_open:
                self._block_open = True
                out += self._event({"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})
            delta = {"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": item}}
            return out + self._event(delta)
        if isinstance(item, dict) and isinstance(item.get("type"), str):
            kind = item["type"]
            _check_field("event", kind, False)  # (it is the event line: a proxied upstream's)
            self._started = self._started or kind == "message_start"
            self._stopped = self._stopped or kind == "message_stop"
            return self._event(item)
        return super().frame(item)

    def observe(self, item: Any) -> tuple[Usage | None, str | None]:
        if not isinstance(item, dict):
            return None, None
        kind = item.get("type")
        if kind == "message_start":
            # The opening usage (its output_tokens a placeholder) counts with message_delta:
            # a stream cut before it has reported no usage.
            message = item.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if not isinstance(usage, dict):
                usage = {}
            self._opening = Usage.from_anthropic(usage)  # (junk counts as 0)
            return None, None
        if kind == "message_delta":
            delta = item.get("delta")
            finish = delta.get("stop_reason") if isinstance(delta, dict) else None
            if not isinstance(finish, str):
                finish = None
            # cumulative counts: cache reads and writes included, as in Usage.from_anthropic
            usage = item.get("usage")
            closing = Usage.from_anthropic(usage if isinstance(usage, dict) else {})
            return closed(self._opening, closing), finish
        return None, None

    def end(self, summary: StreamSummary) -> list[bytes]:
        if self._stopped:
            return []
        frames = [] if self._started else [self._start()]
        if self._block_open:
            frames.append(self._event({"type": "content_block_stop", "index": 0}))
        usage = summary.usage
        delta = {
            "type": "message_delta",
            "delta": _anthropic_stop(summary),
            "usage": {"output_tokens": usage.output_tokens if usage else 0},
        }
        frames.append(self._event(delta))
        frames.append(self._event({"type": "message_stop"}))
        return frames

    def error(self, body: dict[str, Any], summary: StreamSummary) -> list[bytes]:
        status = int(body.get("status") or 500)
        payload = {
            "type": "error",
            "error": {
                "type": _ANTHROPIC_ERRORS.get(status, "api_error"),
                "message": body.get("detail", ""),
                "code": (body.get("error") or {}).get("code"),
            },
            "request_id": body.get("request_id"),
            "retryable": body.get("retryable"),
            "status": status,
        }
        return [self._event(payload)]
