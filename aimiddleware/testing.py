"""``FakeModel``: a deterministic, seedable local chat model for tests and examples.

::

    model = FakeModel(first_token_latency=0, inter_token_delay=0)
    body = await model.complete({"messages": [{"role": "user", "content": "hi"}], "seed": 7})
    async for chunk in model.stream({**request, "stream_options": {"include_usage": True}}):
        ...                                     # OpenAI chat.completion.chunk dicts

    generation = model.generate(request)       # the raw text deltas
    async for delta in generation: ...
    generation.usage, generation.finish_reason, generation.tokens_generated

The text is a pure function of (seed, prompt, temperature): the same request gives the same
text in every run and process; ``temperature=0`` ignores the seed, as greedy decoding would.
Every generated piece is exactly one ``o200k_base`` token, so the usage counted by
:class:`~aimiddleware.tokens.TokenCounter` is exact. Finish reasons: ``stop`` (natural end or a
``stop`` sequence), ``length`` (``max_tokens`` cut it), ``content_filter`` (a configured word in
the prompt: output is cut half-way; or the model would say one: output stops before it),
``tool_calls`` (``tools`` with ``tool_choice`` ``"required"`` or naming a function, or
``"auto"`` with a tool's name in the last user message). All waits are cancellable, and a
cancelled generation keeps the count of tokens it produced.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from aimiddleware._fake_plan import Plan, make_plan
from aimiddleware.context import current_or_none, report_usage
from aimiddleware.errors import InvalidRequest, UpstreamUnavailable
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.models import Usage

__all__ = ["FakeModel", "FakeModelStats", "Generation"]


@dataclass
class FakeModelStats:
    """Running totals over every generation of one :class:`FakeModel`."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0


class Generation:
    """One request's output: an async iterator of text deltas, with its counters.

    In tool-call mode the deltas are fragments of the call's JSON ``arguments``.
    """

    def __init__(self, model: FakeModel, plan: Plan, input_tokens: int) -> None:
        self._model = model
        self.plan = plan
        self.input_tokens = input_tokens
        self.tokens_generated = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False
        self._started = False

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` for what was generated so far (``None`` in text mode)."""
        if self.plan.tool is None:
            return None
        name, call_id = self.plan.tool
        return [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": self.text},
            }
        ]

    @property
    def usage(self) -> Usage:
        """Exact usage so far: partial while running or after a cancel."""
        return Usage(input_tokens=self.input_tokens, output_tokens=self.tokens_generated)

    def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        model, stats = self._model, self._model.stats
        stats.requests += 1
        try:
            for index, (delta, tokens) in enumerate(self.plan.pieces):
                delay = model.first_token_latency if index == 0 else model.inter_token_delay
                if delay > 0:
                    await anyio.sleep(delay)
                else:
                    await anyio.lowlevel.checkpoint()
                if model.fail_after_tokens is not None and (
                    self.tokens_generated >= model.fail_after_tokens
                ):
                    stats.failed += 1
                    raise model.failure()
                self.tokens_generated += tokens
                stats.tokens_generated += tokens
                self.text += delta
                if delta:
                    yield delta
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            stats.cancelled += 1
            raise
        except GeneratorExit:  # the consumer stopped early (closed the iterator)
            self.cancelled = True
            stats.cancelled += 1
            raise
        self.finish_reason = self.plan.finish_reason
        stats.completed += 1


class FakeModel:
    """A local chat model. Configuration only; every request gets its own :class:`Generation`.

    ``first_token_latency`` / ``inter_token_delay``: seconds (0 in tests).
    ``length``: (min, max) tokens of a natural answer.
    ``content_filter``: words that trip the filter (case-insensitive, whole words).
    ``fail_after_tokens``: raise ``failure()`` (default :class:`UpstreamUnavailable`) once that
    many tokens are out, for error-path tests.
    ``token_counter``: shared :class:`TokenCounter`; default one for ``o200k_base``.
    """

    def __init__(
        self,
        name: str = "fake-model",
        *,
        seed: int = 0,
        first_token_latency: float = 0.02,
        inter_token_delay: float = 0.005,
        length: tuple[int, int] = (16, 64),
        content_filter: Collection[str] = (),
        fail_after_tokens: int | None = None,
        failure: Callable[[], BaseException] = UpstreamUnavailable,
        token_counter: TokenCounter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty string")
        if first_token_latency < 0 or inter_token_delay < 0:
            raise ValueError("latencies must be non-negative")
        low, high = length
        if not 1 <= low <= high:
            raise ValueError("length must be (min, max) with 1 <= min <= max")
        if fail_after_tokens is not None and fail_after_tokens < 0:
            raise ValueError("fail_after_tokens must be >= 0")
        if isinstance(content_filter, str):
            raise TypeError("content_filter must be a collection of words, not a string")
        self.name = name
        self.seed = seed
        self.first_token_latency = first_token_latency
        self.inter_token_delay = inter_token_delay
        self.length = (low, high)
        self.content_filter = frozenset(w.lower() for w in content_filter)
        self.fail_after_tokens = fail_after_tokens
        self.failure = failure
        self.counter = token_counter or TokenCounter(default_encoding="o200k_base")
        self.clock = clock
        self.stats = FakeModelStats()
        self._warm = False

    async def warm(self) -> None:
        """Load the vocabulary (about 0.3 s, once per counter) in a worker thread.

        :meth:`complete` and :meth:`stream` call it; call it yourself at startup, or before
        using :meth:`generate` from async code, to keep the event loop free.
        """
        if not self._warm:
            await anyio.to_thread.run_sync(self.counter.encoding, "o200k_base")
            self._warm = True

    def count_tokens(self, text: str) -> int:
        """``text``'s tokens in the vocabulary this model speaks (o200k_base)."""
        if not text:
            return 0
        enc = self.counter.encoding("o200k_base")
        if enc is None:  # (no vocabulary at all: the counter's estimate)
            return self.counter.count_text(text, self.name).tokens
        return len(enc.encode_ordinary(text))

    def _tokenize(self, text: str) -> list[tuple[str, int]]:
        """``text`` as token pieces; tokens that split a UTF-8 character are kept together."""
        enc = self.counter.encoding("o200k_base")
        if enc is None:
            return [(piece, self.count_tokens(piece)) for piece in re.findall(r"\w+|\W", text)]
        pieces: list[tuple[str, int]] = []
        buffered, tokens = b"", 0
        for token in enc.encode_ordinary(text):
            buffered += enc.decode_single_token_bytes(token)
            tokens += 1
            try:
                piece = buffered.decode()
            except UnicodeDecodeError:
                continue
            pieces.append((piece, tokens))
            buffered, tokens = b"", 0
        return pieces

    def generate(self, request: Mapping[str, Any]) -> Generation:
        """Validate ``request`` (a typed 4xx on bad input) and plan its output."""
        plan = make_plan(
            request,
            seed=self.seed,
            length=self.length,
            content_filter=self.content_filter,
            count=self.count_tokens,
            tokenize=self._tokenize,
            rng_for=_rng_for,
        )
        body = {k: request[k] for k in ("messages", "tools", "functions") if k in request}
        try:
            input_tokens = self.counter.count_request(body, self.name).tokens
        except TypeError as exc:  # a shape the counter refuses (as count_tokens answers it)
            raise InvalidRequest(f"Unsupported request shape: {exc}") from None
        return Generation(self, plan, input_tokens)

    async def complete(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """An OpenAI ``chat.completion`` dict."""
        await self.warm()
        generation = self.generate(request)
        async for _ in generation:
            pass
        if generation.plan.tool is not None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": generation.tool_calls,
            }
        else:
            message = {"role": "assistant", "content": generation.text, "refusal": None}
        return {
            **self._envelope("chat.completion", request),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": generation.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": openai_usage(generation.usage),
        }

    def stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` dicts; a final usage chunk if asked for. Bad
        input raises on the first iteration: behind a server that has sent its head by then,
        prefer :meth:`open_stream`."""
        return self._chunks(request, None)

    async def open_stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """:meth:`stream`, the request validated first: bad input raises here, before any
        response is sent (a typed 4xx with its status, refunded by a rate limiter), not as
        an error event after a 200."""
        await self.warm()
        return self._chunks(request, self.generate(request))

    async def _chunks(
        self, request: Mapping[str, Any], generation: Generation | None
    ) -> AsyncIterator[dict[str, Any]]:
        if generation is None:
            await self.warm()
            generation = self.generate(request)
        options = request.get("stream_options") or {}
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        head = self._envelope("chat.completion.chunk", request)
        if include_usage:
            head["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        tool = generation.plan.tool
        if tool is None:
            yield chunk({"role": "assistant", "content": ""})
        else:
            call = {"index": 0, "id": tool[1], "type": "function"}
            call["function"] = {"name": tool[0], "arguments": ""}
            yield chunk({"role": "assistant", "content": None, "tool_calls": [call]})
        try:
            async for delta in generation:
                if tool is None:
                    yield chunk({"content": delta})
                else:
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
        finally:
            # Like a real serving stack, account for what was generated even when the client
            # did not ask for the usage chunk or went away mid-stream (partial usage).
            ctx = current_or_none()
            if ctx is not None:
                report_usage(generation.usage)
        yield chunk({}, generation.finish_reason)
        if include_usage:
            yield {**head, "choices": [], "usage": openai_usage(generation.usage)}

    def _envelope(self, obj: str, request: Mapping[str, Any]) -> dict[str, Any]:
        model = request.get("model")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(self.clock()),
            "model": model if isinstance(model, str) and model else self.name,
            "system_fingerprint": "fp_fake",
        }


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


def _rng_for(seed: int | None, key: Any) -> random.Random:
    """A generator seeded by (seed, canonical JSON of the prompt): stable across processes."""
    canonical = json.dumps([seed, key], sort_keys=True, separators=(",", ":"), default=str)
    return random.Random(hashlib.sha256(canonical.encode()).digest())
