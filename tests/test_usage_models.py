"""Usage converters on provider response samples (documented shapes), Envelope, extraction."""

from __future__ import annotations

import json
import pickle
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from aimiddleware.finish_reason import FinishReason
from aimiddleware.usage.extract import from_response, from_stream_event
from aimiddleware.usage.models import Envelope, Usage, closed, sampling_params

# OpenAI Chat Completions (platform.openai.com/docs/api-reference/chat/object)
OPENAI_CHAT: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The image shows",
                 "refusal": None, "annotations": []}, "logprobs": None,
                 "finish_reason": "length"}],
    "usage": {
        "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 10, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

# OpenAI Responses (platform.openai.com/docs/api-reference/responses/object)
OPENAI_RESPONSE: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "incomplete",
    "incomplete_details": {"reason": "max_output_tokens"},
    "model": "o3-2025-04-16",
    "output": [{"type": "reasoning", "id": "rs_1", "summary": []}],
    "usage": {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128},
              "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 40},
              "total_tokens": 380},
}

# Anthropic Messages (docs.claude.com/en/api/messages)
ANTHROPIC: dict[str, Any] = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 21, "cache_creation_input_tokens": 188086,
              "cache_read_input_tokens": 1500, "output_tokens": 393,
              "cache_creation": {"ephemeral_5m_input_tokens": 188086,
                                 "ephemeral_1h_input_tokens": 0},
              "service_tier": "standard"},
}

# Gemini generateContent (ai.google.dev/api/generate-content#v1beta.GenerateContentResponse)
GEMINI: dict[str, Any] = {
    "candidates": [{"content": {"parts": [{"text": "AI learns patterns."}], "role": "model"},
                    "finishReason": "MAX_TOKENS", "index": 0}],
    "usageMetadata": {"promptTokenCount": 1200, "candidatesTokenCount": 80,
                      "totalTokenCount": 1530, "cachedContentTokenCount": 1000,
                      "thoughtsTokenCount": 230, "toolUsePromptTokenCount": 20,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}]},
    "modelVersion": "gemini-2.5-flash",
    "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
}

BEDROCK_USAGE = {"inputTokens": 125, "outputTokens": 60, "totalTokens": 185}


def test_openai_chat_cached_and_reasoning_are_subsets() -> None:
    u = Usage.from_openai_chat(OPENAI_CHAT["usage"])
    assert u == Usage(input_tokens=1117, output_tokens=46, total_tokens=1163,
                      cached_input_tokens=1024, reasoning_tokens=10)


def test_openai_responses() -> None:
    u = Usage.from_openai_responses(OPENAI_RESPONSE["usage"])
    assert u == Usage(input_tokens=328, output_tokens=52, total_tokens=380,
                      cached_input_tokens=128, reasoning_tokens=40)


def test_anthropic_cache_counts_are_added_to_input() -> None:
    u = Usage.from_anthropic(ANTHROPIC["usage"])
    assert u.input_tokens == 21 + 188086 + 1500
    assert u.cached_input_tokens == 1500 and u.cache_creation_input_tokens == 188086
    assert u.output_tokens == 393 and u.total_tokens == 21 + 188086 + 1500 + 393


def test_gemini_thoughts_are_billed_as_output() -> None:
    u = Usage.from_gemini(GEMINI["usageMetadata"])
    assert u.input_tokens == 1220  # prompt + tool-use prompt
    assert u.output_tokens == 80 + 230 and u.reasoning_tokens == 230
    assert u.cached_input_tokens == 1000 and u.total_tokens == 1530
    snake = Usage.from_gemini({"prompt_token_count": 5, "candidates_token_count": 2,
                               "thoughts_token_count": 3})
    assert snake == Usage(input_tokens=5, output_tokens=5, total_tokens=10, reasoning_tokens=3)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (OPENAI_CHAT["usage"], Usage.from_openai_chat(OPENAI_CHAT["usage"])),
        (OPENAI_RESPONSE["usage"], Usage.from_openai_responses(OPENAI_RESPONSE["usage"])),
        (ANTHROPIC["usage"], Usage.from_anthropic(ANTHROPIC["usage"])),
        (GEMINI["usageMetadata"], Usage.from_gemini(GEMINI["usageMetadata"])),
        (BEDROCK_USAGE, Usage(input_tokens=125, output_tokens=60, total_tokens=185)),
        ({"input_tokens": 3, "output_tokens": 4}, Usage(input_tokens=3, output_tokens=4)),
        ({"input_tokens": 9, "output_tokens": 1, "reasoning_tokens": 1, "total_tokens": 10},
         Usage(input_tokens=9, output_tokens=1, reasoning_tokens=1)),
    ],
)
def test_from_any_recognizes_each_shape(raw: dict[str, Any], want: Usage) -> None:
    assert Usage.from_any(raw) == want


def test_from_any_rejects_and_tolerates_junk() -> None:
    with pytest.raises(ValueError):
        Usage.from_any({"foo": 1})
    # nulls and negative numbers never produce a negative usage
    u = Usage.from_openai_chat({"prompt_tokens": None, "completion_tokens": -3,
                                "prompt_tokens_details": None})
    assert u == Usage()


@pytest.mark.parametrize("junk", [[1], {"n": 1}, float("inf")], ids=["list", "object", "inf"])
def test_a_usage_with_a_non_number_count_is_no_usage_not_a_crash(junk: Any) -> None:
    """The before-validator summed input and output with int(): a list, an object or an
    infinity (JSON 1e400) raised TypeError / OverflowError, which pydantic does not turn into
    a ValidationError, so extraction of such an answer failed instead of finding no usage."""
    for usage in ({"reasoning_tokens": 1, "input_tokens": junk},
                  {"cached_input_tokens": 1, "output_tokens": junk}):
        with pytest.raises(ValidationError):
            Usage.model_validate(usage)
        with pytest.raises(ValueError):
            Usage.from_any(usage)
        assert from_response({"id": "x", "usage": usage}) is None
        assert from_response({"object": "envelope", "usage": usage}) == (
            (None, None, None, None, False))


def test_a_token_figure_past_max_tokens_is_junk() -> None:
    """An upstream's 10**19 was taken as is: past 2**63 it wrapped the Redis limiter's
    counters negative, and on memory it charged the tenant out for the day."""
    from aimiddleware.usage.models import MAX_TOKENS

    huge = 10**19
    assert Usage.from_openai_chat({"prompt_tokens": huge, "completion_tokens": 2,
                                   "total_tokens": huge + 2}) == Usage(output_tokens=2)
    assert Usage.from_openai_responses({"input_tokens": 3, "output_tokens": huge}) == Usage(
        input_tokens=3)
    assert Usage.from_anthropic({"input_tokens": huge, "output_tokens": 2,
                                 "cache_read_input_tokens": huge}) == Usage(output_tokens=2)
    assert Usage.from_gemini({"promptTokenCount": huge, "candidatesTokenCount": 2}) == Usage(
        output_tokens=2)
    assert Usage.from_any({"inputTokens": huge, "outputTokens": 2}) == Usage(output_tokens=2)
    with pytest.raises(ValueError):
        Usage.from_any({"input_tokens": huge, "reasoning_tokens": 1})
    assert from_response({"choices": [], "usage": {"prompt_tokens": huge}}).usage == Usage()
    # the bound itself is still a figure
    assert Usage.from_openai_chat({"prompt_tokens": MAX_TOKENS}).input_tokens == MAX_TOKENS


def test_an_apps_own_figure_past_max_tokens_is_read_as_junk_too() -> None:
    from aimiddleware.usage.models import MAX_TOKENS, believed

    usage = Usage(input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS)  # the bound: believed
    assert believed(usage) is usage
    assert believed(Usage(input_tokens=10**19, output_tokens=5, reasoning_tokens=2)) == Usage(
        output_tokens=5, reasoning_tokens=2)
    assert believed(Usage(input_tokens=3, output_tokens=2, total_tokens=10**19)) == Usage(
        input_tokens=3, output_tokens=2)
    for name in Usage.model_fields:  # every count, each alone (the fast check names them)
        junk = Usage(**{name: 10**19})
        assert getattr(believed(junk), name) == 0, name
    # a Usage itself still holds any sum (a batch's, a month's)
    assert Usage(input_tokens=10**19).input_tokens == 10**19


def test_usage_is_frozen() -> None:
    with pytest.raises(ValidationError):
        Usage(input_tokens=1).input_tokens = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "raw", "provider", "version", "usage"),
    [
        (OPENAI_CHAT, "length", "openai", "gpt-4o-2024-08-06", 1163),
        (OPENAI_RESPONSE, "max_output_tokens", "openai_responses", "o3-2025-04-16", 380),
        (ANTHROPIC, "end_turn", "anthropic", "claude-sonnet-4-5-20250929", 190000),
        (GEMINI, "MAX_TOKENS", "gemini", "gemini-2.5-flash", 1530),
    ],
)
def test_extract_from_provider_responses(
    body: dict[str, Any], raw: str, provider: str, version: str, usage: int
) -> None:
    found = from_response(json.loads(json.dumps(body)))
    assert found is not None and found.usage is not None
    assert (found.raw_finish_reason, found.provider, found.model_version) == (raw, provider,
                                                                              version)
    assert found.usage.total_tokens == usage


def test_extract_gemini_blocked_prompt_and_nothing() -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata":
               {"promptTokenCount": 7, "totalTokenCount": 7}}
    found = from_response(blocked)
    assert found is not None and found.raw_finish_reason == "SAFETY"
    assert from_response({"hello": "world"}) is None
    assert from_response([1, 2]) is None


def test_extract_stream_events() -> None:
    start = {"type": "message_start", "message": {"model": "claude-x", "usage": {
        "input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
             "usage": {"output_tokens": 15}}
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [],
             "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
    got_start = from_stream_event(start)
    assert got_start is not None and got_start.usage == Usage(
        input_tokens=30, output_tokens=1, cached_input_tokens=5)
    assert got_start.provisional  # message_start's output_tokens is a placeholder
    got_delta = from_stream_event(delta)
    assert got_delta is not None and got_delta.raw_finish_reason == "tool_use"
    assert not got_delta.provisional
    got_chunk = from_stream_event(chunk)
    assert got_chunk is not None and got_chunk.usage == Usage(input_tokens=9, output_tokens=3)
    assert from_stream_event({"choices": [{"delta": {"content": "x"}}]}) is None
    assert from_stream_event({"type": "ping"}) is None


def test_envelope_shape_and_rules() -> None:
    env = Envelope(
        id="env_1", model="gpt-4o", model_version="gpt-4o-2024-08-06", output="hi",
        finish_reason=FinishReason.LENGTH, raw_finish_reason="length",
        usage=Usage(input_tokens=1, output_tokens=2), estimated_cost=Decimal("0.0000225"),
        request_duration_ms=12.5, request_id="req_1", sampling={"seed": 7},
        parsing_error="<root>: Invalid JSON",
    )
    data = env.model_dump(mode="json")
    assert data["finish_reason"] == "length" and data["estimated_cost"] == "0.0000225"
    assert data["usage"]["total_tokens"] == 3 and data["output"] == "hi"
    assert Envelope.model_validate_json(env.model_dump_json()) == env
    with pytest.raises(ValidationError):
        Envelope(id="x", parsed={"a": 1}, parsing_error="bad")
    with pytest.raises(ValidationError):
        Envelope(id="x", confidence=1.5)
    with pytest.raises(ValidationError):
        env.output = "changed"  # type: ignore[misc]


def test_sampling_params() -> None:
    assert sampling_params({"model": "m", "seed": 1, "temperature": 0}) == {"seed": 1,
                                                                           "temperature": 0}
    assert sampling_params({"model": "m"}) is None
    assert sampling_params({"generationConfig": {"topP": 0.9, "seed": 3}}) == {"seed": 3,
                                                                              "top_p": 0.9}
    assert sampling_params("nope") is None


@pytest.mark.parametrize(
    ("convert", "raw"),
    [
        (Usage.from_openai_chat, {"prompt_tokens": 7, "completion_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 2}}),
        (Usage.from_openai_responses, {"input_tokens": 5, "output_tokens": True,
                                       "output_tokens_details": {"reasoning_tokens": -1}}),
        (Usage.from_anthropic, {"input_tokens": 4, "output_tokens": 2,
                                "cache_read_input_tokens": 1, "cache_creation_input_tokens": 3}),
        (Usage.from_gemini, {"promptTokenCount": 9, "candidatesTokenCount": 1,
                             "thoughtsTokenCount": 2, "totalTokenCount": 0}),
    ],
)
def test_fast_converters_build_what_validation_builds(convert: Any, raw: dict[str, Any]) -> None:
    fast = convert(raw)  # built without validation, from checked ints
    valid = Usage.model_validate(fast.model_dump())
    assert fast == valid and hash(fast) == hash(valid)
    assert fast.model_dump_json() == valid.model_dump_json()
    assert all(type(v) is int and v >= 0 for v in fast.model_dump().values())
    assert fast.total_tokens >= fast.input_tokens + fast.output_tokens or raw.get("total_tokens")
    assert "cache_creation_input_tokens" not in fast.model_dump(exclude_unset=True) or (
        convert == Usage.from_anthropic
    )
    with pytest.raises(ValidationError):
        fast.input_tokens = 1  # type: ignore[misc]
    assert fast.model_copy(update={"input_tokens": 1}).input_tokens == 1


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(OPENAI_CHAT).encode(),
        b' {"a": 1, "a": 2} ',  # duplicate keys: the last wins, as in json
        b'{"s": "\\ud800", "n": 123456789012345678901234567890}',  # lone surrogate, big int
        '{"a": "é"}'.encode("utf-16"),  # another JSON encoding
        b'{"a": [Infinity, -Infinity]}',
        b"[" * 500 + b"]" * 500,  # deeper than from_json's limit, not json's
    ],
)
def test_parse_json_reads_what_json_reads(raw: bytes) -> None:
    from aimiddleware.usage.extract import parse_json

    assert parse_json(raw) == json.loads(raw)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"a": 1} trailing', b"\xff\xfe\xfd", b"[" * 100_000 + b"]" * 100_000],
)
def test_parse_json_gives_none_for_non_json(raw: bytes) -> None:
    from aimiddleware.usage.extract import parse_json

    assert parse_json(raw) is None


def test_openai_chat_extraction_tolerates_odd_members() -> None:
    body = {**OPENAI_CHAT, "model": 5, "choices": ["x"], "usage": {"prompt_tokens": -3,
            "completion_tokens": True, "total_tokens": "9"}}
    got = from_response(body)
    assert got is not None and type(got).__name__ == "Extracted"
    assert got.usage == Usage(input_tokens=0, output_tokens=0, total_tokens=0)
    assert (got.raw_finish_reason, got.provider, got.model_version) == (None, "openai", None)
    empty = from_response({**OPENAI_CHAT, "choices": [], "usage": None})
    assert empty == (None, None, "openai", "gpt-4o-2024-08-06", False)


def test_openai_chat_usage_shares_one_fields_set_like_a_validated_one() -> None:
    """from_openai_chat's Usage shares one fields set (not a copy each): equal, hashed,
    dumped, shown and frozen as the validated Usage; a copy never touches the shared set."""
    from aimiddleware.usage.models import _FIVE, _FIVE_SET

    raw = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
           "completion_tokens_details": {"reasoning_tokens": 1}}
    a, b = Usage.from_openai_chat(raw), Usage.from_openai_chat(raw)
    valid = Usage(input_tokens=7, output_tokens=3, total_tokens=10, cached_input_tokens=0,
                  reasoning_tokens=1)
    assert a.__pydantic_fields_set__ is b.__pydantic_fields_set__ is _FIVE_SET
    assert _FIVE_SET == _FIVE == valid.model_fields_set
    assert a == valid and hash(a) == hash(valid) and repr(a) == repr(valid)
    assert a.model_dump() == valid.model_dump()
    assert a.model_dump(exclude_unset=True) == valid.model_dump(exclude_unset=True)
    with pytest.raises(ValidationError):
        a.output_tokens = 1  # type: ignore[misc]
    copied = a.model_copy(update={"cache_creation_input_tokens": 2})
    assert copied.cache_creation_input_tokens == 2
    assert "cache_creation_input_tokens" in copied.model_fields_set
    assert a.model_copy().model_fields_set is not _FIVE_SET
    assert _FIVE_SET == _FIVE and a.model_fields_set == _FIVE  # untouched
    assert pickle.loads(pickle.dumps(a)) == a


def test_a_streams_closing_usage_takes_the_output_side_from_the_closing_figure() -> None:
    opening = Usage.from_anthropic(
        {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 1}
    )
    # The closing message_delta of the older API carries only output_tokens.
    assert closed(opening, Usage.from_anthropic({"output_tokens": 0})) == Usage(
        input_tokens=125, output_tokens=0, total_tokens=125, cached_input_tokens=100
    )
    # The newer one repeats the input counts; thinking tokens come from the closing figure.
    closing = Usage.from_anthropic({
        "input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 40,
        "output_tokens_details": {"thinking_tokens": 30},
    })
    assert closed(opening, closing) == closing
    assert closed(None, closing) is closing


@pytest.mark.parametrize(
    ("tail", "read"),
    [
        (b'[1.5, 2.5]}], "usage": {"prompt_tokens": 7, "total_tokens": 7}}', True),
        (b'[1.5]}], "usage" :\n {"prompt_tokens": 7, "total_tokens": 7}\n}\n', True),
        # a key that only ends in "usage" (an escaped quote before it): not the member
        (b'[1.5]}], "x\\"usage": {"prompt_tokens": 7, "total_tokens": 7}}', False),
        (b'[1.5]}], "my_usage": {"prompt_tokens": 7}, "n": 1}', False),
    ],
)
def test_usage_read_from_the_tail_of_a_body_only_for_the_usage_member(
    tail: bytes, read: bool
) -> None:
    from aimiddleware.usage.extract import from_tail

    found = from_tail(tail)
    assert (found is not None and found.usage == Usage(input_tokens=7)) is read


def test_the_served_model_of_a_large_body_is_read_from_its_head_and_tail() -> None:
    from aimiddleware.usage.extract import from_head, from_tail

    for body in (OPENAI_CHAT, OPENAI_RESPONSE, ANTHROPIC):
        raw = json.dumps(body, indent=2).encode()
        found = from_head(raw[:300])
        assert found is not None and found.model_version == body["model"]
        assert found.usage is None and found.raw_finish_reason is None
    for head in (
        b'{"id": "a", "meta": {"model": "evil"}, "data": [',  # nested: not the answer's
        b'{"data": [1, 2, 3',  # the member before it cut: not reached
        b'[{"model": "evil"}]',  # not an object
        b'{"id": "a" "model": "m"}',  # not JSON
        b'{"model": 5}',
        b'{"id": "\xff", "model": "m"}',  # not UTF-8
        b"",
    ):
        assert from_head(head) is None, head
    cut = '{"id": "caf\u00e9", "model": "m\u00e9"}'.encode()[:-3]  # a character cut short
    assert from_head(cut) is None
    assert from_head('{"id": "caf\u00e9", "model": "m\u00e9"}'.encode()).model_version == "m\u00e9"
    tail = b'5]}], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 7}}'
    found = from_tail(tail)
    assert found is not None and found.model_version == "text-embedding-3-small"
    nested = b'"model": "evil"}], "usage": {"prompt_tokens": 7}}'
    found = from_tail(nested)
    assert found is not None and found.model_version is None
