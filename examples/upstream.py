"""Proxy to a real OpenAI-compatible upstream (vLLM, Ollama, a provider) through httpx.

The stack does the rest: the request is admitted and priced before this runs, the usage in
the upstream's answer (JSON ``usage``, or the stream's final usage chunk, which we ask for)
is read on the way out, and a client that goes away cancels this coroutine, which closes the
upstream connection (so the upstream stops generating).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

import httpx

from aimiddleware import (
    EventStreamResponse,
    InvalidRequest,
    OpenAIChatDialect,
    StreamResult,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    Usage,
)
from aimiddleware.client import RetryPolicy

__all__ = ["Upstream"]

_WAITS = RetryPolicy()  # (its server_delay: retry-after-ms, else Retry-After seconds or date)


class Upstream:
    def __init__(self, base_url: str, api_key: str = "", timeout: float = 120.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    @classmethod
    def from_env(cls) -> Upstream | None:
        url = os.environ.get("AIMW_UPSTREAM_URL")
        return cls(url, os.environ.get("AIMW_UPSTREAM_API_KEY", "")) if url else None

    async def aclose(self) -> None:
        await self.client.aclose()

    async def chat(self, request: dict[str, Any]) -> Any:
        if not request.get("stream"):
            response = await self.client.post("/chat/completions", json=request)
            _raise_for_status(response)
            return response.json()
        # The upstream's head is awaited before ours is sent, so its refusal (a 429, a
        # rejected request, the upstream down) is the client's status, not an error event
        # after a 200. The usage chunk is always asked for (the stack records it); the client
        # gets it only if it asked.
        options = request.get("stream_options")
        wanted = isinstance(options, dict) and options.get("include_usage") is True
        upstream = {**request, "stream_options": {"include_usage": True}}
        built = self.client.build_request("POST", "/chat/completions", json=upstream)
        response = await self.client.send(built, stream=True)
        if response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
            _raise_for_status(response)
        return EventStreamResponse(
            _Chunks(response, self._chunks(response, wanted)),
            dialect=OpenAIChatDialect.for_request(request),
        )

    async def _chunks(self, response: httpx.Response, wanted: bool) -> AsyncGenerator[Any, None]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise UpstreamError(extra={"upstream_error": chunk["error"].get("type")})
                if not wanted:
                    usage = chunk.pop("usage", None)
                    if isinstance(usage, dict):
                        # usage the client did not ask for: recorded, not sent (on its own
                        # chunk, or on the last one with choices, as some upstreams send it)
                        yield StreamResult(usage=Usage.from_openai_chat(usage))
                        if not chunk.get("choices"):
                            continue
                yield chunk
        finally:
            await response.aclose()  # (also on a disconnect: the upstream stops generating)


class _Chunks:
    """The stream's source: ``aclose`` also closes the upstream response when the stream
    never started (closing an async generator before its first item runs none of its code,
    and a HEAD, a resume or a client gone before our head closes it so)."""

    def __init__(self, response: httpx.Response, chunks: AsyncGenerator[Any, None]) -> None:
        self.response = response
        self.chunks = chunks

    def __aiter__(self) -> _Chunks:
        return self

    def __anext__(self) -> Awaitable[Any]:
        return self.chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self.chunks.aclose()
        finally:
            await self.response.aclose()


def _raise_for_status(response: httpx.Response) -> None:
    """Map an upstream failure to the taxonomy without echoing the upstream's message; an
    upstream 429 keeps its wait (read as the retrying client reads it)."""
    status = response.status_code
    if status < 400:
        return
    code = None
    with contextlib.suppress(ValueError, AttributeError):
        code = (json.loads(response.content).get("error") or {}).get("code")
    extra = {"upstream_status": status, "upstream_code": code}
    if status == 429:
        raise UpstreamRateLimited(extra=extra, retry_after=_WAITS.server_delay(response.headers))
    if status >= 500:
        raise UpstreamUnavailable(extra=extra)
    if status in (400, 404, 413, 422):
        raise InvalidRequest("The upstream model rejected the request.", extra=extra)
    raise UpstreamError(extra=extra)
