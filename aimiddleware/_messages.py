"""Token tallies over request shapes (internal to :mod:`aimiddleware.tokens`).

The OpenAI cookbook rule (``How_to_count_tokens_with_tiktoken``): every message costs 3
tokens plus its encoded values, a ``name`` 1 more, and the reply is primed with 3. Tools:
``func_init`` (7 on o200k models, 10 on cl100k), ``name:description`` encoded, ``prop_init`` 3,
``prop_key`` 3 and ``name:type:description`` per property, ``enum_init`` -3 and ``enum_item`` 3
per enum value, ``func_end`` 12. Parts the rule does not cover (images, tool-call arguments,
unknown blocks) are counted from their JSON and make the count inexact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Plan", "Tally", "as_list", "chat_tokens", "embeddings_input", "estimate", "text_size",
]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_TOKENS = 85  # OpenAI's low-detail image cost; an estimate for any image part
_TEXT_KEYS = ("text", "input_text", "output_text")
_IMAGE_TYPES = {"image", "image_url", "input_image", "file", "document"}
_IMAGE_KEYS = ("image_url", "inline_data", "inlineData", "fileData", "file_data")
_SCALARS = (int, float, bool, type(None))
_ITEM_ENVELOPE = frozenset(("type", "id", "status"))  # of a Responses message item
_EMBEDDINGS_KEYS = ("encoding_format", "dimensions")  # of an embeddings body, no other shape
#: Content blocks nested in content blocks deeper than this are refused (TypeError): no API
#: nests them so, and each level costs two Python frames (past ~450, a RecursionError).
MAX_DEPTH = 32
#: Role names whose token counts a Plan precomputes (each saves one encode per message).
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "model")


def estimate(text: str) -> int:
    """Rough tokens for an unknown tokenizer: 4 ASCII chars per token, 1 per other char."""
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // 4) + (len(text) - ascii_chars)


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    raise TypeError("messages and tools must be lists")


def text_size(obj: Any, stop: int) -> int:
    """Characters of string content in ``obj``, stopping early past ``stop``."""
    total = 0
    stack = [obj]
    while stack and total <= stop:
        item = stack.pop()
        kind = type(item)  # exact JSON types first: ABC isinstance checks cost ~0.1 us each
        if kind is str:
            total += len(item)
        elif kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind in _SCALARS:
            continue
        elif isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


def _token_ids(value: Any) -> bool:
    """A list of token ids (a legacy completions prompt may be one, or a list of them)."""
    return isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)


def embeddings_input(body: Mapping[str, Any]) -> list[Any] | None:
    """The inputs of an OpenAI embeddings body (texts and token-id lists), else ``None``.

    An ``input`` list of strings or token ids is one (a Responses ``input`` list holds
    objects); a single string only beside ``encoding_format`` or ``dimensions`` (the
    official ``openai`` SDK always sends ``encoding_format``): alone it may be Responses.
    """
    inp = body.get("input")
    if "messages" in body:  # (a chat body's input is not what the model reads)
        return None
    if isinstance(inp, str):
        return [inp] if any(key in body for key in _EMBEDDINGS_KEYS) else None
    if not isinstance(inp, list) or not inp:
        return None
    if _token_ids(inp):  # one input of token ids
        return [inp]
    if all(isinstance(item, str) or _token_ids(item) for item in inp):
        return inp
    return None


def _input_item(item: Any) -> Any:
    """A Responses message item as the chat message it is (no ``type``/``id``/``status``)."""
    if isinstance(item, Mapping) and "role" in item and not _ITEM_ENVELOPE.isdisjoint(item):
        return {k: v for k, v in item.items() if k not in _ITEM_ENVELOPE}
    return item


class Plan:
    """How one model's texts are counted, resolved once per model by the TokenCounter.

    ``count``: tokens of one text (encodes, consults the digest cache, or estimates).
    ``encode``: the encoding's ``encode_ordinary`` (``None`` when estimating), called directly
    for texts shorter than ``floor`` (the cache's minimum, or no limit without a cache).
    ``known``: precomputed counts of the role names. ``results``: filled by the counter.
    ``core``: what ``encode`` calls (tiktoken's Rust encoder, when it has one): the hot path
    calls it without the Python wrapper, and falls back to ``encode`` on the error the wrapper
    repairs (lone surrogates).
    """

    __slots__ = (
        "core", "count", "encode", "exact", "floor", "known", "name", "o200k", "results",
    )

    def __init__(
        self,
        name: str | None,
        count: Callable[[str], int],
        encode: Callable[[str], Any] | None,
        floor: int,
    ) -> None:
        self.name = name
        self.exact = encode is not None
        self.count = count
        self.encode = encode
        core = getattr(getattr(encode, "__self__", None), "_core_bpe", None)
        self.core = getattr(core, "encode_ordinary", None) or encode
        self.floor = floor
        self.known: dict[str, int] = {role: count(role) for role in ROLES} if encode else {}
        self.o200k = bool(name and name.startswith("o200k"))
        self.results: dict[int, Any] = {}  # exact count -> its (frozen) TokenCount, bounded

    def tally(self) -> Tally:
        return Tally(self.count, exact=self.exact, o200k=self.o200k)


def chat_tokens(messages: list[Any], plan: Plan) -> tuple[int, bool]:
    """``Tally.chat(messages, [])`` (tokens, exact) on the per-request hot path.

    Plain ``{"role": ..., "content": "..."}`` messages are counted inline (no Tally, role
    names from ``plan.known``, no per-text function layers); any other message or value
    is handed to a Tally built on first need, so the result is the same in every case.
    """
    core, floor, known, count = plan.core, plan.floor, plan.known, plan.count
    assert core is not None
    tokens = REPLY_PRIMING
    tally: Tally | None = None
    for message in messages:
        if type(message) is dict and "role" in message:
            tokens += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if type(value) is str:
                    n = known.get(value)
                    if n is None:
                        if len(value) < floor:
                            try:
                                n = len(core(value))
                            except UnicodeEncodeError:  # (the wrapper re-encodes it)
                                n = len(plan.encode(value))  # type: ignore[misc]
                        else:
                            n = count(value)
                    tokens += n + TOKENS_PER_NAME if key == "name" else n
                else:
                    if tally is None:
                        tally = plan.tally()
                    tally.item(key, value)
        else:
            if tally is None:
                tally = plan.tally()
            tally.message(message)
    if tally is None:
        return tokens, True
    return tokens + tally.tokens, tally.exact


class Tally:
    """Accumulates tokens (``count`` encodes or estimates one text) and an ``exact`` flag."""

    __slots__ = ("count", "depth", "exact", "func_init", "tokens")

    def __init__(self, count: Callable[[str], int], *, exact: bool, o200k: bool) -> None:
        self.count = count
        self.exact = exact
        self.tokens = 0
        self.func_init = 7 if o200k else 10
        self.depth = 0

    def text(self, text: str) -> int:
        n = self.count(text)
        self.tokens += n
        return n

    def approx(self, value: Any) -> None:
        self.exact = False
        self.text(value if isinstance(value, str) else json.dumps(value, separators=(",", ":")))

    # -- values -------------------------------------------------------------------------

    def value(self, value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, str):
            self.text(value)
        elif isinstance(value, list | tuple):
            for part in value:
                self.part(part)
        elif isinstance(value, Mapping):
            self.part(value)
        else:
            self.approx(str(value))

    def nested(self, value: Any) -> None:
        """:meth:`value` of a block's inner content, one level deeper (bounded)."""
        if self.depth >= MAX_DEPTH:
            raise TypeError(f"content blocks nested more than {MAX_DEPTH} deep")
        self.depth += 1
        try:
            self.value(value)
        finally:
            self.depth -= 1

    def part(self, part: Any) -> None:
        if isinstance(part, str):
            self.text(part)
            return
        if not isinstance(part, Mapping):
            self.approx(part)
            return
        kind = part.get("type")
        if type(kind) is not str:  # ([1], {}: unhashable, no type of any API)
            kind = None
        for key in _TEXT_KEYS:
            if isinstance(part.get(key), str):
                self.text(part[key])
                return
        if kind in _IMAGE_TYPES or any(k in part for k in _IMAGE_KEYS):
            self.exact = False
            self.tokens += IMAGE_TOKENS
        elif kind == "tool_result" or "functionResponse" in part:
            self.nested(part.get("content", part.get("functionResponse")))
        elif kind in ("tool_use", "function_call") or "functionCall" in part:
            call = part.get("functionCall", part)
            if isinstance(call, Mapping):
                args = call.get("input", call.get("args", call.get("arguments")))
                self.approx({"name": call.get("name"), "arguments": args})
            else:  # (a functionCall that is no object)
                self.approx(call)
        elif kind == "function_call_output":
            self.nested(part.get("output"))
        elif "content" in part:
            self.nested(part.get("content"))
        else:
            self.approx(part)

    # -- chat ---------------------------------------------------------------------------

    def chat(self, messages: list[Any], tools: list[Any]) -> None:
        for message in messages:
            self.message(message)
        self.tokens += REPLY_PRIMING
        if tools:
            self.tools(tools)

    def message(self, message: Any) -> None:
        self.tokens += TOKENS_PER_MESSAGE
        if type(message) is not dict and not isinstance(message, Mapping):
            self.value(message)
            return
        if "role" not in message:  # Responses items (function_call, ...): no published rule
            self.part(message)
            self.exact = False
            return
        for key, value in message.items():
            self.item(key, value)

    def item(self, key: Any, value: Any) -> None:
        """One ``key: value`` of a chat message."""
        if isinstance(value, str):
            if key == "name":
                self.tokens += TOKENS_PER_NAME
            self.text(value)
        elif key in ("tool_calls", "function_call"):
            self.approx(value)
        else:
            self.value(value)

    def tools(self, tools: list[Any]) -> None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                self.approx(tool)
                continue
            fn = tool.get("function", tool)  # chat: {"function": {...}}; Responses: flat
            if not isinstance(fn, Mapping) or "name" not in fn:
                self.approx(tool)  # built-in tools (web_search, ...): not in the rule
                continue
            self.tokens += self.func_init
            desc = str(fn.get("description") or "").removesuffix(".")
            self.text(f"{fn['name']}:{desc}")
            params = fn.get("parameters", fn.get("input_schema")) or {}
            props = params.get("properties") if isinstance(params, Mapping) else None
            if isinstance(props, Mapping) and props:
                self.tokens += 3  # prop_init
                for key, prop in props.items():
                    self.tokens += 3  # prop_key
                    prop = prop if isinstance(prop, Mapping) else {}
                    enum = prop.get("enum")
                    if isinstance(enum, list):
                        self.tokens -= 3  # enum_init
                        for item in enum:
                            self.tokens += 3  # enum_item
                            self.text(str(item))
                    pdesc = str(prop.get("description") or "").removesuffix(".")
                    self.text(f"{key}:{prop.get('type', '')}:{pdesc}")
        self.tokens += 12  # func_end

    def inputs(self, items: list[Any]) -> None:
        """Model inputs with no chat overhead (embeddings, a legacy prompt): each a text, a
        list of token ids (one token each), or else estimated from its JSON."""
        for item in items:
            if isinstance(item, str):
                self.text(item)
            elif _token_ids(item):
                self.tokens += len(item)
            else:
                self.approx(item)

    # -- request shapes -----------------------------------------------------------------

    def request(self, body: Mapping[str, Any]) -> None:
        if "input" in body:
            inputs = embeddings_input(body)
            if inputs is not None:  # embeddings: the texts alone, no chat overhead
                self.inputs(inputs)
                return
        tools = body.get("tools") or body.get("functions") or []
        tools = tools if isinstance(tools, list) else [tools]
        messages: list[Any] = []
        system = body.get("system", body.get("instructions"))
        if system:
            messages.append({"role": "system", "content": system})
        gemini_system = body.get("systemInstruction", body.get("system_instruction"))
        if isinstance(gemini_system, Mapping):
            messages.append({"role": "system", "content": gemini_system.get("parts")})
        if not ("messages" in body or "input" in body or "contents" in body or "prompt" in body):
            raise TypeError("the body has no messages, input, contents or prompt")
        for key in ("messages", "contents"):
            if key in body and not isinstance(body[key], list):
                raise TypeError(f"{key} must be a list")
        if isinstance(body.get("messages"), list):
            messages.extend(body["messages"])
        elif "input" in body:
            inp = body["input"]
            if isinstance(inp, str):
                messages.append({"role": "user", "content": inp})
            else:
                messages.extend(_input_item(item) for item in as_list(inp))
        elif isinstance(body.get("contents"), list):
            for content in body["contents"]:
                if isinstance(content, Mapping):
                    role = content.get("role", "user")
                    messages.append({"role": role, "content": content.get("parts")})
                else:
                    messages.append({"role": "user", "content": content})
            tools = [
                fn for group in tools if isinstance(group, Mapping)
                for fn in group.get("functionDeclarations", group.get("function_declarations", []))
            ]
        elif "prompt" in body:  # legacy completions: no chat overhead
            prompt = body["prompt"]
            if _token_ids(prompt):  # one prompt of token ids
                prompt = [prompt]
            self.inputs(prompt if isinstance(prompt, list) else [prompt])
            return
        self.chat(messages, tools)
