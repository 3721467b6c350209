"""Usage and envelope models: frozen, pure, no I/O.

Provider usage objects differ in what their numbers mean; the converters fold them into one
:class:`Usage` whose ``input_tokens`` counts every billed input token and whose subsets are
explicit:

- OpenAI Chat / Responses: cached ⊂ prompt/input, reasoning ⊂ completion/output.
- Anthropic: ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` are **added to**
  ``input_tokens`` (billed input = input + creation + read).
- Gemini: ``cachedContentTokenCount`` ⊂ prompt; ``thoughtsTokenCount`` is **not** in
  ``candidatesTokenCount`` but billed as output, so output = candidates + thoughts;
  ``toolUsePromptTokenCount`` is input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import suppress
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from aimiddleware._trusted import (
    new_model,
    set_dict,
    set_extra,
    set_fields_set,
    set_private,
    trusted,
)
from aimiddleware.finish_reason import FinishReason

__all__ = ["SAMPLING_PARAMS", "Envelope", "Usage", "believed", "sampling_params"]

#: Request parameters echoed in ``Envelope.sampling`` when the request set them.
SAMPLING_PARAMS = ("seed", "temperature", "top_p", "top_k")

#: The largest token figure a provider's usage object is believed for (~4.3 billion, far
#: past any model's context). A larger one is junk, read as 0 like a negative number or a
#: string: from an upstream, 10**19 tokens wrapped the Redis limiter's counters to -2**63
#: (no limit left for the window) and locked a tenant out on memory for the day.
MAX_TOKENS = 2**32 - 1


def _int(data: Mapping[str, Any] | None, *keys: str) -> int:
    """The first present key as an int of 0..MAX_TOKENS (nulls and junk count as 0)."""
    if not isinstance(data, Mapping):
        return 0
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value if 0 < value <= MAX_TOKENS else 0
    return 0


def _int1(data: Mapping[str, Any] | None, key: str) -> int:
    """:func:`_int` of one key, always a plain ``int`` (fast for the usual plain int)."""
    if type(data) is dict:
        value = data.get(key)
        if type(value) is int:
            return value if 0 < value <= MAX_TOKENS else 0
    return int(_int(data, key))


def _sub(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    return value if isinstance(value, Mapping) else None


_FIVE = frozenset(
    ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens", "reasoning_tokens")
)
_SIX = _FIVE | {"cache_creation_input_tokens"}
# The fields set of every Usage from_openai_chat builds, one set shared (not a copy each: a
# frozen model never changes it, model_copy copies it first). A set, not a frozenset, as
# model_copy(update=...) adds to the copy. The ledger knows such a Usage by this identity.
_FIVE_SET: set[str] = set(_FIVE)


class Usage(BaseModel):
    """Tokens one call used.

    ``input_tokens`` counts every billed input token, cache reads and writes included;
    ``cached_input_tokens`` and ``cache_creation_input_tokens`` are subsets of it, and
    ``reasoning_tokens`` a subset of ``output_tokens``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0
    total_tokens: NonNegativeInt = 0
    cached_input_tokens: NonNegativeInt = 0
    cache_creation_input_tokens: NonNegativeInt = 0
    reasoning_tokens: NonNegativeInt = 0

    @model_validator(mode="before")
    @classmethod
    def _fill_total(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("total_tokens"):
            data = dict(data)
            with suppress(TypeError, OverflowError):  # ([1], {"n": 1}, inf: the fields
                # refuse them; pydantic would not turn these errors into a ValidationError)
                data["total_tokens"] = int(data.get("input_tokens") or 0) + int(
                    data.get("output_tokens") or 0
                )
        return data

    # -- converters -----------------------------------------------------------------------

    @classmethod
    def _of(
        cls,
        inp: int,
        out: int,
        total: int,
        cached: int,
        reasoning: int,
        created: int = 0,
        fields_set: frozenset[str] = _FIVE,
    ) -> Usage:
        """From plain non-negative ints, as validation would build it (total filled in)."""
        values = {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": total or inp + out,
            "cached_input_tokens": cached,
            "cache_creation_input_tokens": created,
            "reasoning_tokens": reasoning,
        }
        return trusted(cls, values, fields_set)

    @classmethod
    def from_openai_chat(cls, usage: Mapping[str, Any]) -> Usage:
        """``prompt_tokens`` / ``completion_tokens`` with their ``*_details`` subsets."""
        # per response: plain non-negative ints are taken as they are, anything else via _int1
        get = usage.get
        inp = get("prompt_tokens")
        if type(inp) is not int or not 0 <= inp <= MAX_TOKENS:
            inp = _int1(usage, "prompt_tokens")
        out = get("completion_tokens")
        if type(out) is not int or not 0 <= out <= MAX_TOKENS:
            out = _int1(usage, "completion_tokens")
        total = get("total_tokens")
        if type(total) is not int or not 0 <= total <= MAX_TOKENS:
            total = _int1(usage, "total_tokens")
        details = get("prompt_tokens_details")
        cached = _int1(details, "cached_tokens") if details else 0
        details = get("completion_tokens_details")
        reasoning = _int1(details, "reasoning_tokens") if details else 0
        # trusted(cls, values, _FIVE), inline, the fields set shared (per response)
        obj = new_model(cls)
        set_dict(obj, {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": total or inp + out,
            "cached_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "reasoning_tokens": reasoning,
        })
        # (shared only by Usage itself: a subclass may be mutable, and pydantic adds an
        # assigned field's name to the instance's set in place)
        set_fields_set(obj, _FIVE_SET if cls is Usage else set(_FIVE))
        set_extra(obj, None)
        set_private(obj, None)
        return obj

    @classmethod
    def from_openai_responses(cls, usage: Mapping[str, Any]) -> Usage:
        """``input_tokens`` / ``output_tokens`` with their ``*_details`` subsets."""
        return cls._of(
            _int1(usage, "input_tokens"),
            _int1(usage, "output_tokens"),
            _int1(usage, "total_tokens"),
            _int1(_sub(usage, "input_tokens_details"), "cached_tokens"),
            _int1(_sub(usage, "output_tokens_details"), "reasoning_tokens"),
        )

    @classmethod
    def from_anthropic(cls, usage: Mapping[str, Any]) -> Usage:
        """Cache reads and writes are added to ``input_tokens``; thinking ⊂ output."""
        created = _int1(usage, "cache_creation_input_tokens")
        read = _int1(usage, "cache_read_input_tokens")
        inp = _int1(usage, "input_tokens") + created + read
        out = _int1(usage, "output_tokens")
        thinking = _int1(_sub(usage, "output_tokens_details"), "thinking_tokens")
        return cls._of(inp, out, inp + out, read, min(thinking, out), created, _SIX)

    @classmethod
    def from_gemini(cls, usage: Mapping[str, Any]) -> Usage:
        """``usageMetadata`` (camelCase or the SDK's snake_case): thoughts billed as output."""
        prompt = int(_int(usage, "promptTokenCount", "prompt_token_count"))
        tool = int(_int(usage, "toolUsePromptTokenCount", "tool_use_prompt_token_count"))
        candidates = int(_int(usage, "candidatesTokenCount", "candidates_token_count"))
        thoughts = int(_int(usage, "thoughtsTokenCount", "thoughts_token_count"))
        inp, out = prompt + tool, candidates + thoughts
        cached = int(_int(usage, "cachedContentTokenCount", "cached_content_token_count"))
        total = int(_int(usage, "totalTokenCount", "total_token_count"))
        return cls._of(inp, out, total, cached, thoughts)

    @classmethod
    def from_any(cls, usage: Mapping[str, Any]) -> Usage:
        """Recognize the shape by its keys; ``ValueError`` if it is no known usage object."""
        if not isinstance(usage, Mapping):
            raise ValueError("usage must be a JSON object")
        keys = set(usage)
        if "prompt_tokens" in keys or "completion_tokens" in keys:
            return cls.from_openai_chat(usage)
        if keys & {"promptTokenCount", "prompt_token_count", "candidatesTokenCount"}:
            return cls.from_gemini(usage)
        if keys & {"cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation"}:
            return cls.from_anthropic(usage)
        if keys & {"input_tokens_details", "output_tokens_details"}:
            return cls.from_openai_responses(usage)
        if "cached_input_tokens" in keys or "reasoning_tokens" in keys:
            fields = {k: v for k, v in usage.items() if k in cls.model_fields}
            if any(type(v) is int and v > MAX_TOKENS for v in fields.values()):
                raise ValueError("a token count past MAX_TOKENS")  # (as junk is, here)
            return cls.model_validate(fields)
        if "input_tokens" in keys or "output_tokens" in keys:
            return cls.from_openai_responses(usage)  # Anthropic without cache reads reads the same
        if "inputTokens" in keys or "outputTokens" in keys:  # Bedrock Converse
            return cls(
                input_tokens=_int(usage, "inputTokens"),
                output_tokens=_int(usage, "outputTokens"),
                total_tokens=_int(usage, "totalTokens"),
                cached_input_tokens=_int(usage, "cacheReadInputTokens"),
                cache_creation_input_tokens=_int(usage, "cacheWriteInputTokens"),
            )
        raise ValueError("not a recognized usage object")


def believed(usage: Usage) -> Usage:
    """An app's own per-call ``usage`` as the stack takes it (``report_usage``, an
    ``@envelope`` completion or body, a stream's ``Usage``, a job step): a count past
    MAX_TOKENS is junk, read as 0 as in a provider's usage (a junk total: input + output).
    ``usage`` itself when every count is believed. (A Usage's own validation takes any
    non-negative int: it also holds sums, a batch's or a month's.)"""
    if max(  # (the usual case, without building anything)
        usage.input_tokens, usage.output_tokens, usage.total_tokens,
        usage.cached_input_tokens, usage.cache_creation_input_tokens, usage.reasoning_tokens,
    ) <= MAX_TOKENS:
        return usage
    values = {name: getattr(usage, name) for name in Usage.model_fields}
    fixed = {name: 0 for name, value in values.items() if value > MAX_TOKENS}
    if "total_tokens" in fixed:
        fixed["total_tokens"] = (fixed.get("input_tokens", values["input_tokens"])
                                 + fixed.get("output_tokens", values["output_tokens"]))
        if fixed == {"total_tokens": values["total_tokens"]}:
            return usage  # (the total of two believed figures)
    return usage.model_copy(update=fixed)


def merge(old: Usage | None, new: Usage | None) -> Usage | None:
    """Field-wise max: streamed usage is cumulative (Anthropic start + delta, Gemini chunks)."""
    if old is None or new is None:
        return new or old
    fields = {k: max(getattr(old, k), getattr(new, k)) for k in Usage.model_fields}
    both = fields["input_tokens"] + fields["output_tokens"]
    fields["total_tokens"] = max(fields["total_tokens"], both)
    return Usage(**fields)


def closed(opening: Usage | None, closing: Usage) -> Usage:
    """A stream's closing usage completed by its opening one (Anthropic ``message_start``).

    The opening ``output_tokens`` is a placeholder (``1``), so the output side (output and
    reasoning tokens) is the closing figure alone, even ``0``; the input side is the larger
    of the two, as a ``message_delta`` may or may not repeat the input counts.
    """
    if opening is None:
        return closing
    inp = max(opening.input_tokens, closing.input_tokens)
    out = closing.output_tokens
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        cached_input_tokens=max(opening.cached_input_tokens, closing.cached_input_tokens),
        cache_creation_input_tokens=max(
            opening.cache_creation_input_tokens, closing.cache_creation_input_tokens
        ),
        reasoning_tokens=closing.reasoning_tokens,
    )


def sampling_params(body: Any) -> dict[str, Any] | None:
    """The reproducibility-shaping parameters a request set (``None`` if it set none)."""
    if not isinstance(body, Mapping):
        return None
    found = {k: body[k] for k in SAMPLING_PARAMS if body.get(k) is not None}
    config = body.get("generationConfig")  # Gemini
    if isinstance(config, Mapping):
        for key, camel in (("seed", "seed"), ("temperature", "temperature"),
                           ("top_p", "topP"), ("top_k", "topK")):
            if config.get(camel) is not None:
                found.setdefault(key, config[camel])
    return found or None


class Envelope(BaseModel):
    """What an AI endpoint answers: the output and everything needed to account for it.

    ``model`` is the name as requested, ``model_version`` the snapshot that served it.
    ``parsed``/``parsing_error``: for structured output, the parsed value, or why the raw
    ``output`` (kept untouched) failed its schema; never both, and never a repaired output.
    ``sampling`` echoes ``seed``/``temperature``/``top_p``/``top_k`` when the request set
    them, so a client can tell whether two answers were meant to be comparable.
    ``estimated_cost`` serializes as a decimal string (no float rounding).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    id: str
    object: str = "envelope"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str | None = None
    model_version: str | None = None
    output: Any = None
    finish_reason: FinishReason | None = None
    raw_finish_reason: str | None = None
    usage: Usage | None = None
    estimated_cost: Decimal | None = None
    request_duration_ms: float | None = None
    request_id: str | None = None
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    parsed: Any = None
    parsing_error: str | None = None
    sampling: dict[str, Any] | None = None
    system_fingerprint: str | None = None

    @model_validator(mode="after")
    def _parsed_xor_error(self) -> Envelope:
        if self.parsing_error is not None and self.parsed is not None:
            raise ValueError("an envelope carries either parsed or parsing_error, not both")
        return self
