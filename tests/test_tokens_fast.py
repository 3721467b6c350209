"""TokenCounter's per-request fast path gives exactly the general rule's counts."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimiddleware import _vocab
from aimiddleware.tokens import TokenCount, TokenCounter

PLAIN = TokenCounter(cache_size=0)
CACHED = TokenCounter(cache_min_chars=4)
PLAIN.preload("o200k_base", "cl100k_base")
CACHED.preload("o200k_base", "cl100k_base")


class Text(str):
    """A str subclass: JSON never gives one, but the general rule accepts it."""


texts = st.one_of(
    st.sampled_from(["hello", "user", "assistant", "system", "", " ", "日本語 text", "🙂🙂"]),
    st.text(max_size=40),
    st.builds(Text, st.text(max_size=10)),
)
parts = st.one_of(
    texts,
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.just({"type": "image_url", "image_url": {"url": "data:,"}}),
    st.just({"type": "tool_use", "name": "f", "input": {"a": 1}}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "content": texts}),
    st.just({"other": 1}),
)
values = st.one_of(texts, st.none(), st.booleans(), st.integers(), st.lists(parts, max_size=3))
messages = st.one_of(
    st.dictionaries(
        st.sampled_from(["content", "name", "tool_calls", "function_call", "refusal", "x"]),
        values,
        max_size=4,
    ).flatmap(
        lambda rest: st.builds(
            lambda role: {"role": role, **rest},
            st.sampled_from(["user", "assistant", "system", "tool", "robot", Text("user")]),
        )
    ),
    st.just({"type": "function_call", "name": "f", "arguments": "{}"}),
    texts,
)
bodies = st.fixed_dictionaries(
    {"messages": st.lists(messages, max_size=5)},
    optional={
        "model": st.sampled_from(["gpt-4o-mini", "gpt-4", "claude-3-opus", 7]),
        "system": texts,
        "tools": st.just([{"type": "function", "function": {"name": "f", "description": "d"}}]),
        "contents": st.just([]),
    },
)


def general(counter: TokenCounter, body: dict[str, Any], model: str | None) -> TokenCount:
    """The general rule (Tally.request), which the fast path must equal."""
    if model is None and isinstance(body.get("model"), str):
        model = body["model"]
    plan = counter._plan(model)
    tally = plan.tally()
    tally.request(body)
    return TokenCount(tally.tokens, tally.exact, plan.name)


@settings(max_examples=300, deadline=None)
@given(body=bodies, model=st.sampled_from([None, "gpt-4o", "gpt-4o-mini-2024-07-18"]))
def test_fast_path_equals_the_general_rule(body: dict[str, Any], model: str | None) -> None:
    for counter in (PLAIN, CACHED):
        try:
            want = general(counter, body, model)
        except TypeError:
            with pytest.raises(TypeError):
                counter.count_request(body, model)
            continue
        assert counter.count_request(body, model) == want
        plan = counter._plan(model)
        tally = plan.tally()
        tally.chat(body["messages"], [])
        want = TokenCount(tally.tokens, tally.exact, plan.name)
        assert counter.count_messages(body["messages"], model) == want


def test_the_bench_body_and_a_1kb_prompt() -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello"}]}
    enc = PLAIN.encoding("o200k_base")
    assert enc is not None
    # the cookbook rule: 3 per message + role + content, 3 for priming
    want = 3 + len(enc.encode("user")) + len(enc.encode("hello")) + 3
    for counter in (PLAIN, CACHED):
        assert counter.count_request(body, "gpt-4o-mini-2024-07-18") == TokenCount(
            want, True, "o200k_base"
        )
    prompt = ("Summarise the following support ticket in two sentences. " * 18)[:1024]
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    want = 3 + 1 + len(enc.encode_ordinary(prompt)) + 3
    for _ in range(2):  # the second CACHED count is a digest-cache hit
        assert PLAIN.count_request(big).tokens == CACHED.count_request(big).tokens == want


def test_a_repaired_vocabulary_turns_estimates_exact(tmp_path: Path) -> None:
    """Per-model plans are dropped when preload() installs an encoding."""
    raw = gzip.decompress(_vocab.bundled_path("cl100k_base").read_bytes())  # type: ignore[union-attr]
    path = tmp_path / "cl100k_base.tiktoken"
    path.write_bytes(raw.replace(b" 100\n", b" 101\n", 1))
    counter = TokenCounter(vocab_files={"cl100k_base": path})
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hello world"}]}
    assert counter.count_request(body).exact is False  # tampered: an estimate
    path.write_bytes(raw)
    counter.preload("cl100k_base")
    assert counter.count_request(body) == TokenCount(3 + 1 + 2 + 3, True, "cl100k_base")


def test_large_counts_are_not_memoized() -> None:
    counter = TokenCounter(cache_size=0)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 3000}]}
    first, second = counter.count_request(body), counter.count_request(body)
    assert first == second and first.tokens > 3000 and first is not second
    small = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert counter.count_request(small) is counter.count_request(small)  # frozen, shared
    assert all(n < 2048 for memo in counter._memo.values() for n in memo)


def test_lone_surrogates_count_as_the_wrapper_repairs_them() -> None:
    # The fast path calls tiktoken's Rust encoder directly; on a lone surrogate it falls
    # back to encode_ordinary, which re-encodes the text first.
    body = {"messages": [{"role": "user", "content": "a\ud800b"}, {"role": "\udfffx"}]}
    for counter in (PLAIN, CACHED):
        plan = counter._plan("gpt-4o")
        assert plan.core is not plan.encode  # the Rust encoder was found
        assert counter.count_request(body, "gpt-4o") == general(counter, body, "gpt-4o")
        assert counter.count_request(body, "gpt-4o").tokens > 6
