"""Why generation stopped: one vocabulary for every provider, the raw value always kept.

``FinishReason`` has ``stop``, ``length``, ``content_filter``, ``tool_calls``, ``error``,
``cancelled`` and ``other``. :func:`normalize_finish_reason` maps the values of OpenAI (Chat
and Responses), Anthropic, Gemini, Bedrock, Cohere, Mistral, vLLM, TGI and Ollama. A value it
does not know becomes ``other``, never ``stop``: a truncation or an error must not look like a
success (LiteLLM's ``map_finish_reason`` returns ``stop`` for unknown values).

Choices worth knowing: Anthropic ``pause_turn`` (a server-tool turn to be continued) is
``other``; context-window ceilings (``model_context_window_exceeded``, Mistral
``model_length``, Cohere ``ERROR_LIMIT``) are ``length``; malformed tool calls are ``error``;
vLLM ``abort`` and Cohere ``USER_CANCEL`` are ``cancelled``; Ollama's empty ``done_reason``
(connection closed) is ``cancelled`` with ``provider="ollama"``.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["PROVIDERS", "FinishReason", "finish_reason_value", "normalize_finish_reason"]


class FinishReason(str, Enum):  # noqa: UP042 (StrEnum would change str(member))
    """The normalized reason; a ``str`` so it serializes as its value."""

    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"
    ERROR = "error"
    CANCELLED = "cancelled"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


_S, _L, _F = FinishReason.STOP, FinishReason.LENGTH, FinishReason.CONTENT_FILTER
_T, _E, _C, _O = (
    FinishReason.TOOL_CALLS, FinishReason.ERROR, FinishReason.CANCELLED, FinishReason.OTHER
)

# Values shared by several providers, matched case-insensitively.
_COMMON: dict[str, FinishReason] = {
    # OpenAI Chat, Mistral, vLLM, Ollama
    "stop": _S, "length": _L, "tool_calls": _T, "content_filter": _F, "function_call": _T,
    "error": _E, "model_length": _L, "abort": _C, "repetition": _O, "load": _O, "unload": _O,
    # OpenAI Responses (status and incomplete_details.reason)
    "completed": _S, "failed": _E, "cancelled": _C, "in_progress": _O, "queued": _O,
    "incomplete": _O, "max_output_tokens": _L,
    # Anthropic, Bedrock
    "end_turn": _S, "max_tokens": _L, "stop_sequence": _S, "tool_use": _T, "pause_turn": _O,
    "refusal": _F, "model_context_window_exceeded": _L, "guardrail_intervened": _F,
    "content_filtered": _F, "malformed_model_output": _E, "malformed_tool_use": _E,
    # Gemini finishReason and promptFeedback.blockReason
    "finish_reason_unspecified": _O, "safety": _F, "recitation": _F, "language": _F,
    "other": _O, "blocklist": _F, "prohibited_content": _F, "spii": _F,
    "malformed_function_call": _E, "image_safety": _F, "unexpected_tool_call": _E,
    "too_many_tool_calls": _E, "image_prohibited_content": _F, "no_image": _O,
    "image_recitation": _F, "image_other": _O, "model_armor": _F, "jailbreak": _F,
    "block_reason_unspecified": _O,
    # Cohere v2 and v1
    "complete": _S, "tool_call": _T, "timeout": _E, "error_toxic": _F, "error_limit": _L,
    "user_cancel": _C,
    # HF TGI
    "eos_token": _S, "eos": _S,
}

# Where one provider's value means something else than the shared reading.
_BY_PROVIDER: dict[str, dict[str, FinishReason]] = {
    "openai": {},
    "openai_responses": {},
    "anthropic": {},
    "gemini": {},
    "bedrock": {},
    "cohere": {},
    "mistral": {},
    "vllm": {},
    "tgi": {},
    "ollama": {"": _C},  # done_reason "" = the connection closed before the end
}

#: Provider names accepted by :func:`normalize_finish_reason`.
PROVIDERS = frozenset(_BY_PROVIDER)

# Exact values that need neither stripping, lower-casing nor a provider lookup: the usual case.
_PLAIN: dict[str, FinishReason] = {
    k: v for k, v in _COMMON.items() if not any(k in special for special in _BY_PROVIDER.values())
}


def normalize_finish_reason(raw: object, provider: str | None = None) -> FinishReason:
    """The normalized reason for a provider's raw value; unknown values give ``other``.

    ``provider`` (one of :data:`PROVIDERS`, case-insensitive) only matters where a value is
    provider-specific; an unknown provider name is treated as ``None``.
    """
    if type(raw) is str:
        found = _PLAIN.get(raw)
        if found is not None:
            return found
    if isinstance(raw, FinishReason):
        return raw
    if not isinstance(raw, str):
        return FinishReason.OTHER
    key = raw.strip().lower()
    if provider:
        special = _BY_PROVIDER.get(provider.lower().replace("-", "_"), {})
        if key in special:
            return special[key]
    return _COMMON.get(key, FinishReason.OTHER)


# raw -> the normalized value as a plain str, for the usual exact values (no enum per call).
_PLAIN_VALUES: dict[str, str] = {k: v.value for k, v in _PLAIN.items()}


def finish_reason_value(raw: object, provider: str | None = None) -> str:
    """``normalize_finish_reason(raw, provider).value``, one dict lookup in the usual case."""
    if type(raw) is str:
        found = _PLAIN_VALUES.get(raw)
        if found is not None:
            return found
    return normalize_finish_reason(raw, provider).value
