"""normalize_finish_reason: every provider value in the reference table, unknown -> other."""

from __future__ import annotations

import pytest

from aimiddleware.finish_reason import (
    PROVIDERS,
    FinishReason,
    finish_reason_value,
    normalize_finish_reason,
)

S, L, F, T = "stop", "length", "content_filter", "tool_calls"
E, C, O = "error", "cancelled", "other"  # noqa: E741

# (provider, raw value, expected) for every value listed in
# shared/reference/errors-versioning-usage.md section 3.
TABLE = [
    # OpenAI Chat
    ("openai", "stop", S), ("openai", "length", L), ("openai", "tool_calls", T),
    ("openai", "content_filter", F), ("openai", "function_call", T),
    # OpenAI Responses: status, incomplete_details.reason
    ("openai_responses", "completed", S), ("openai_responses", "failed", E),
    ("openai_responses", "in_progress", O), ("openai_responses", "cancelled", C),
    ("openai_responses", "queued", O), ("openai_responses", "incomplete", O),
    ("openai_responses", "max_output_tokens", L), ("openai_responses", "content_filter", F),
    # Anthropic
    ("anthropic", "end_turn", S), ("anthropic", "max_tokens", L),
    ("anthropic", "stop_sequence", S), ("anthropic", "tool_use", T),
    ("anthropic", "pause_turn", O), ("anthropic", "refusal", F),
    ("anthropic", "model_context_window_exceeded", L),
    # Gemini finishReason
    ("gemini", "FINISH_REASON_UNSPECIFIED", O), ("gemini", "STOP", S),
    ("gemini", "MAX_TOKENS", L), ("gemini", "SAFETY", F), ("gemini", "RECITATION", F),
    ("gemini", "LANGUAGE", F), ("gemini", "OTHER", O), ("gemini", "BLOCKLIST", F),
    ("gemini", "PROHIBITED_CONTENT", F), ("gemini", "SPII", F),
    ("gemini", "MALFORMED_FUNCTION_CALL", E), ("gemini", "IMAGE_SAFETY", F),
    ("gemini", "UNEXPECTED_TOOL_CALL", E), ("gemini", "TOO_MANY_TOOL_CALLS", E),
    ("gemini", "IMAGE_PROHIBITED_CONTENT", F), ("gemini", "NO_IMAGE", O),
    ("gemini", "IMAGE_RECITATION", F), ("gemini", "IMAGE_OTHER", O),
    # Gemini promptFeedback.blockReason
    ("gemini", "MODEL_ARMOR", F), ("gemini", "JAILBREAK", F),
    # Bedrock Converse
    ("bedrock", "end_turn", S), ("bedrock", "tool_use", T), ("bedrock", "max_tokens", L),
    ("bedrock", "stop_sequence", S), ("bedrock", "guardrail_intervened", F),
    ("bedrock", "content_filtered", F), ("bedrock", "malformed_model_output", E),
    ("bedrock", "malformed_tool_use", E), ("bedrock", "model_context_window_exceeded", L),
    # Cohere v2 and v1
    ("cohere", "COMPLETE", S), ("cohere", "STOP_SEQUENCE", S), ("cohere", "MAX_TOKENS", L),
    ("cohere", "TOOL_CALL", T), ("cohere", "ERROR", E), ("cohere", "TIMEOUT", E),
    ("cohere", "ERROR_TOXIC", F), ("cohere", "ERROR_LIMIT", L), ("cohere", "USER_CANCEL", C),
    # Mistral
    ("mistral", "stop", S), ("mistral", "length", L), ("mistral", "model_length", L),
    ("mistral", "error", E), ("mistral", "tool_calls", T),
    # vLLM v1
    ("vllm", "stop", S), ("vllm", "length", L), ("vllm", "abort", C), ("vllm", "error", E),
    ("vllm", "repetition", O),
    # HF TGI
    ("tgi", "length", L), ("tgi", "eos_token", S), ("tgi", "stop_sequence", S),
    # Ollama done_reason
    ("ollama", "stop", S), ("ollama", "length", L), ("ollama", "", C),
    ("ollama", "load", O), ("ollama", "unload", O),
]


@pytest.mark.parametrize(("provider", "raw", "expected"), TABLE)
def test_every_documented_value(provider: str, raw: str, expected: str) -> None:
    assert provider in PROVIDERS
    got = normalize_finish_reason(raw, provider)
    assert got is FinishReason(expected)
    assert got == expected and str(got) == expected


@pytest.mark.parametrize(("provider", "raw", "expected"), [r for r in TABLE if r[1]])
def test_values_need_no_provider_hint(provider: str, raw: str, expected: str) -> None:
    assert normalize_finish_reason(raw) is FinishReason(expected)


@pytest.mark.parametrize(
    "raw", ["compaction", "brand_new_reason", "STOPPED", "done", None, 42, ["stop"]]
)
def test_unknown_values_are_other_never_stop(raw: object) -> None:
    assert normalize_finish_reason(raw) is FinishReason.OTHER
    assert normalize_finish_reason(raw, "anthropic") is FinishReason.OTHER


def test_empty_value_is_only_cancelled_for_ollama() -> None:
    assert normalize_finish_reason("") is FinishReason.OTHER
    assert normalize_finish_reason("", "openai") is FinishReason.OTHER
    assert normalize_finish_reason("", "OLLAMA") is FinishReason.CANCELLED


def test_case_whitespace_and_passthrough() -> None:
    assert normalize_finish_reason(" End_Turn ") is FinishReason.STOP
    assert normalize_finish_reason(FinishReason.LENGTH) is FinishReason.LENGTH
    assert normalize_finish_reason("stop", "no-such-provider") is FinishReason.STOP
    assert {r.value for r in FinishReason} == {S, L, F, T, E, C, O}


@pytest.mark.parametrize(
    ("raw", "provider"),
    [(r, p) for p, r, _ in TABLE] + [(" End_Turn ", None), ("", "ollama"), (None, None),
                                     (42, "openai"), (FinishReason.LENGTH, None), ("new", None)],
)
def test_value_helper_matches_normalize(raw: object, provider: str | None) -> None:
    got = finish_reason_value(raw, provider)
    assert type(got) is str and got == normalize_finish_reason(raw, provider).value
