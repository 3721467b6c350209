"""Read usage, finish reason and served model out of a provider-shaped response (pure).

Recognized bodies: OpenAI Chat Completions / legacy completions (``choices``), OpenAI
Responses (``object: "response"``), Anthropic Messages (``type: "message"``), Gemini
``generateContent`` (``candidates`` / ``usageMetadata``), aimiddleware's own ``Envelope``, and
any object with a recognizable ``usage`` member. Streaming chunks of the same providers
(an OpenAI chunk with ``usage``, Anthropic ``message_start``/``message_delta``, Gemini
chunks) are read by :func:`from_stream_event`. An Anthropic ``message_start`` gives the
stream's opening usage, whose ``output_tokens`` is a placeholder: it is marked
``provisional`` and counts only with the ``message_delta`` that closes the stream.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic_core import from_json

from aimiddleware.usage.models import Usage, believed

__all__ = [
    "HEAD_BYTES", "TAIL_BYTES", "Extracted", "from_head", "from_response", "from_stream_event",
    "from_tail", "parse_json",
]

#: The last bytes of a JSON body too large to parse that :func:`from_tail` reads.
TAIL_BYTES = 4096
#: The first bytes of such a body that :func:`from_head` reads.
HEAD_BYTES = 4096
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def parse_json(raw: bytes) -> Any:
    """A response body as JSON; ``None`` if it is not JSON.

    ``pydantic_core.from_json`` first (about 3x ``json.loads`` on small bodies); it refuses
    what ``json`` may still read (lone surrogates, other encodings, deep nesting), so on an
    error ``json.loads`` decides: UTF-8 first, then any JSON encoding (BOM, UTF-16/32).
    """
    try:
        return from_json(raw)
    except ValueError:
        pass
    try:
        return json.loads(raw.decode())
    except ValueError:  # includes UnicodeDecodeError
        pass
    except RecursionError:  # nested deeper than Python recurses: not a usage body
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


class Extracted(NamedTuple):
    """What a response says (immutable; a light tuple, built on every response)."""

    usage: Usage | None = None
    raw_finish_reason: str | None = None
    provider: str | None = None
    model_version: str | None = None
    #: The usage is a stream's opening figure (Anthropic ``message_start``), not yet what the
    #: call used: it counts once the stream's closing usage arrives.
    provisional: bool = False


def _usage(value: Any, convert: Any = None) -> Usage | None:
    if type(value) is not dict and not isinstance(value, Mapping):
        return None
    try:
        return convert(value) if convert is not None else Usage.from_any(value)
    except ValueError:
        return None


def _envelope_usage(value: Any) -> Usage:
    return believed(Usage.model_validate(value))  # (a count past MAX_TOKENS is junk)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _first(value: Any) -> Mapping[str, Any]:
    if isinstance(value, list) and value:
        first = value[0]
        if type(first) is dict or isinstance(first, Mapping):
            return first
    return _EMPTY


_EMPTY: Mapping[str, Any] = {}


_tuple = tuple.__new__  # Extracted(...) without its Python-level __new__ (per response)


def from_response(body: Any) -> Extracted | None:
    """What a complete JSON response says about its usage; ``None`` if nothing."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    obj = body.get("object")
    if obj == "envelope":
        return Extracted(
            _usage(body.get("usage"), _envelope_usage),
            _str(body.get("raw_finish_reason")) or _str(body.get("finish_reason")),
            None,
            _str(body.get("model_version")),
        )
    choices = body.get("choices")
    if isinstance(choices, list):  # OpenAI Chat: the usual case, read with fewer calls
        usage = body.get("usage")
        first = choices[0] if choices else None
        reason = first.get("finish_reason") if type(first) is dict else (
            _first(choices).get("finish_reason"))
        model = body.get("model")
        return _tuple(Extracted, (
            Usage.from_openai_chat(usage) if type(usage) is dict else (
                _usage(usage, Usage.from_openai_chat)),
            reason if type(reason) is str else _str(reason),
            "openai",
            model if type(model) is str else _str(model),
            False,
        ))
    model = _str(body.get("model"))
    if obj == "response":
        status = _str(body.get("status"))
        details = body.get("incomplete_details")
        if status == "incomplete" and isinstance(details, Mapping):
            status = _str(details.get("reason")) or status
        return Extracted(
            _usage(body.get("usage"), Usage.from_openai_responses),
            status,
            "openai_responses",
            model,
        )
    if body.get("type") == "message" and "stop_reason" in body:
        return Extracted(
            _usage(body.get("usage"), Usage.from_anthropic),
            _str(body.get("stop_reason")),
            "anthropic",
            model,
        )
    if "candidates" in body or "usageMetadata" in body or "promptFeedback" in body:
        raw = _str(_first(body.get("candidates")).get("finishReason"))
        feedback = body.get("promptFeedback")
        if raw is None and isinstance(feedback, Mapping):
            raw = _str(feedback.get("blockReason"))
        return Extracted(
            _usage(body.get("usageMetadata"), Usage.from_gemini),
            raw,
            "gemini",
            _str(body.get("modelVersion")) or model,
        )
    usage = _usage(body.get("usage"))
    if usage is None:
        return None
    return Extracted(usage, _str(body.get("finish_reason")), None, model)


def from_tail(tail: bytes) -> Extracted | None:
    """The usage of a JSON body too large to parse, from its last bytes ``tail``.

    Read when the last ``"usage"`` key there is a member of the top-level object, as in
    OpenAI's embeddings (its last member), chat and Responses answers: what follows it,
    given an opening brace, must read as one JSON object (one level closed, nothing after),
    which no key nested deeper passes. ``None`` otherwise. A top-level ``model`` there (an
    embeddings answer's, just before its usage) is read the same way.
    """
    usage = _usage(_tail_member(tail, b'"usage"'))
    if usage is None:
        return None
    model = _tail_member(tail, b'"model"')
    return Extracted(usage, None, None, model if isinstance(model, str) else None)


def _tail_member(tail: bytes, key: bytes) -> Any:
    """The value of the last ``key`` (quoted) in ``tail`` if that is a member of the
    top-level object (see :func:`from_tail`); ``None`` otherwise."""
    at = tail.rfind(key)
    if at < 0 or tail[:at].rstrip()[-1:] not in (b",", b"{"):  # (not a key ending so: x\"usage)
        return None
    try:
        members = _DECODER.decode("{" + tail[at:].decode())
    except (ValueError, RecursionError):  # (UnicodeDecodeError included)
        return None
    return members.get(key[1:-1].decode()) if isinstance(members, dict) else None


def from_head(head: bytes) -> Extracted | None:
    """The served model of a JSON body too large to parse, from its first bytes ``head``.

    A top-level ``model`` string, as OpenAI's chat and Responses answers and Anthropic's
    name it near their start: the top-level members are read one by one from the opening
    brace (a key nested deeper is inside a member's value, never taken), up to ``model`` or
    the first member not there whole. ``None`` otherwise. (Usage and finish reason are not
    read here: a finish reason inside ``choices`` is out of reach.)
    """
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # (a cut last character
    except UnicodeDecodeError:  # kept back; other encodings are not read)
        return None
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        return None
    i += 1
    try:
        while True:
            i = _skip(text, i)
            if text[i:i + 1] != '"':
                return None
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                return None
            value, i = _DECODER.raw_decode(text, _skip(text, i + 1))
            if key == "model":
                return Extracted(None, None, None, value) if isinstance(value, str) else None
            i = _skip(text, i)
            if text[i:i + 1] != ",":
                return None
            i += 1
    except (ValueError, RecursionError):  # (a member cut by the end of the head)
        return None


def _skip(text: str, i: int) -> int:
    """Past the JSON whitespace at ``i``."""
    found = _SPACE.match(text, i)
    return i if found is None else found.end()


def from_stream_event(event: Any) -> Extracted | None:
    """Usage or finish reason carried by one streamed JSON event (``None`` if neither)."""
    if not isinstance(event, Mapping):
        return None
    kind = event.get("type")
    if kind == "message_start" and isinstance(event.get("message"), Mapping):
        msg = event["message"]
        usage = _usage(msg.get("usage"), Usage.from_anthropic)
        return Extracted(usage, None, "anthropic", _str(msg.get("model")), True)
    if kind == "message_delta":
        delta = event.get("delta")
        raw = _str(delta.get("stop_reason")) if isinstance(delta, Mapping) else None
        return Extracted(_usage(event.get("usage"), Usage.from_anthropic), raw, "anthropic")
    if kind in ("response.completed", "response.incomplete", "response.failed"):
        return from_response(event.get("response"))
    if "choices" in event:
        raw = _str(_first(event.get("choices")).get("finish_reason"))
        usage = _usage(event.get("usage"), Usage.from_openai_chat)
        if usage is None and raw is None:
            return None
        return Extracted(usage, raw, "openai", _str(event.get("model")))
    if "candidates" in event or "usageMetadata" in event:
        return from_response(event)
    return None
