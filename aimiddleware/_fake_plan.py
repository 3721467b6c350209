"""The pure half of :class:`~aimiddleware.testing.FakeModel`: validate a chat request and plan
its whole output (the pieces, their token counts, the finish reason) before any is streamed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aimiddleware.errors import ValidationFailed

__all__ = ["VOCABULARY", "Plan", "make_plan"]

# Each of " word", " Word" and "Word" is exactly one o200k_base token (checked by the tests).
VOCABULARY = tuple(
    [
        "the",
        "model",
        "token",
        "stream",
        "answer",
        "request",
        "rate",
        "limit",
        "usage",
        "cost",
        "time",
        "data",
        "system",
        "user",
        "server",
        "client",
        "result",
        "value",
        "memory",
        "context",
        "reply",
        "quick",
        "simple",
        "clear",
        "small",
        "large",
        "good",
        "new",
        "first",
        "last",
        "next",
        "open",
        "early",
        "late",
        "short",
        "long",
        "fast",
        "slow",
        "light",
        "dark",
        "warm",
        "cold",
        "bright",
        "river",
        "mountain",
        "garden",
        "window",
        "letter",
        "number",
        "signal",
        "pattern",
        "market",
        "planet",
        "ocean",
        "forest",
        "city",
        "music",
        "story",
        "paper",
        "water",
        "stone",
        "cloud",
        "field",
        "bridge",
        "road",
        "train",
        "sound",
        "color",
    ]
)

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Plan:
    pieces: tuple[tuple[str, int], ...]  # (text delta, tokens it costs)
    finish_reason: str
    tool: tuple[str, str] | None  # (function name, call id) in tool-call mode


def make_plan(
    request: Mapping[str, Any],
    *,
    seed: int,
    length: tuple[int, int],
    content_filter: Collection[str],
    count: Callable[[str], int],
    tokenize: Callable[[str], list[tuple[str, int]]],
    rng_for: Callable[[int | None, Any], random.Random],
) -> Plan:
    if not isinstance(request, Mapping):
        raise ValidationFailed("The request body must be a JSON object.")
    messages = _messages(request)
    limit = _max_tokens(request)
    stops = _stops(request)
    temperature = _number(request, "temperature", 0.0, 2.0)
    req_seed = request.get("seed")
    if req_seed is not None and (isinstance(req_seed, bool) or not isinstance(req_seed, int)):
        raise ValidationFailed("seed must be an integer.", param="seed")
    if request.get("n") not in (None, 1):
        raise ValidationFailed("Only n=1 is supported.", param="n")
    tools = request.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValidationFailed("tools must be an array.", param="tools")

    effective_seed = None if temperature == 0 else (req_seed if req_seed is not None else seed)
    rng = rng_for(effective_seed, [messages, tools, temperature])
    prompt_words = {w.lower() for m in messages for w in _WORD.findall(_text(m.get("content")))}
    tool = _tool_choice(request, tools, messages)
    natural = rng.randint(*length)
    finish = "stop"
    if tool is not None:
        raw = tokenize(_arguments(tool, rng))
        call = (tool["name"], "call_" + "".join(rng.choices("0123456789abcdef", k=24)))
        finish = "tool_calls"
    else:
        call = None
        raw = [(p, count(p)) for p in _sentences(rng, natural)]
        if content_filter and prompt_words & set(content_filter):
            raw, finish = raw[: max(1, len(raw) // 2)], "content_filter"

    pieces: list[tuple[str, int]] = []
    tokens, text = 0, ""
    for piece, cost in raw:
        if call is None and piece.strip().lower() in content_filter:
            finish = "content_filter"
            break
        if limit is not None and tokens + cost > limit:
            finish = "length"
            break
        tokens += cost
        text += piece
        pieces.append((piece, cost))
        hit = _first_stop(text, stops)
        if hit is not None:  # hide the stop sequence, even where it began in earlier pieces
            pieces, finish = _clip(pieces, hit), "stop"
            break
    return Plan(tuple(pieces), finish, call)


def _clip(pieces: list[tuple[str, int]], visible: int) -> list[tuple[str, int]]:
    """Keep the first ``visible`` characters; hidden pieces still cost their tokens."""
    out, pos = [], 0
    for piece, cost in pieces:
        keep = max(0, min(len(piece), visible - pos))
        out.append((piece[:keep], cost))
        pos += len(piece)
    return out


def _sentences(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    capital = True
    since_stop = 0
    while len(out) < n:
        left = n - len(out)
        if since_stop >= 4 and out[-1] != "," and (left == 1 or rng.random() < 0.18):
            out.append(".")
            capital, since_stop = True, 0
            continue
        if since_stop >= 3 and left > 2 and rng.random() < 0.08 and out[-1] not in ",.":
            out.append(",")
            continue
        word = rng.choice(VOCABULARY)
        word = word.capitalize() if capital else word
        out.append(word if not out else " " + word)
        capital = False
        since_stop += 1
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _messages(request: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValidationFailed("messages must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValidationFailed("Each message needs a role.", param=f"messages[{i}]")
    return messages


def _max_tokens(request: Mapping[str, Any]) -> int | None:
    for param in ("max_completion_tokens", "max_tokens"):
        value = request.get(param)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValidationFailed(f"{param} must be a positive integer.", param=param)
        return value
    return None


def _number(request: Mapping[str, Any], param: str, low: float, high: float) -> float | None:
    value = request.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValidationFailed(f"{param} must be a number in [{low}, {high}].", param=param)
    return float(value)


def _stops(request: Mapping[str, Any]) -> list[str]:
    stop = request.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ValidationFailed("stop must be a string or up to 4 strings.", param="stop")
    return stops


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _tool_choice(
    request: Mapping[str, Any], tools: list[Any] | None, messages: list[Mapping[str, Any]]
) -> dict[str, Any] | None:
    functions = [
        t["function"]
        for t in tools or []
        if isinstance(t, Mapping)
        and isinstance(t.get("function"), Mapping)
        and isinstance(t["function"].get("name"), str)
    ]
    if not functions:
        return None
    choice = request.get("tool_choice", "auto")
    if isinstance(choice, Mapping):
        wanted = (choice.get("function") or {}).get("name")
        for f in functions:
            if f["name"] == wanted:
                return dict(f)
        raise ValidationFailed("tool_choice names no given tool.", param="tool_choice")
    if choice == "required":
        return dict(functions[0])
    if choice == "auto":
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        said = _text(last_user.get("content")) if last_user else ""
        return next((dict(f) for f in functions if f["name"] in said), None)
    return None


def _arguments(function: Mapping[str, Any], rng: random.Random) -> str:
    params = function.get("parameters")
    props = params.get("properties") if isinstance(params, Mapping) else None
    args: dict[str, Any] = {}
    for key, schema in (props or {}).items() if isinstance(props, Mapping) else ():
        args[key] = _value(schema if isinstance(schema, Mapping) else {}, rng)
    return json.dumps(args)


def _value(schema: Mapping[str, Any], rng: random.Random) -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    kind = schema.get("type")
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [rng.choice(VOCABULARY) for _ in range(rng.randint(1, 3))]
    if kind == "object":
        return {}
    return rng.choice(VOCABULARY)
