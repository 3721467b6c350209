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
from collections.abc import AsyncIterator
from typing import Any

import httpx

from aimiddleware import (
    EventStreamResponse,
    InvalidRequest,
    OpenAIChatDialect,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)

__all__ = ["Upstream"]


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

    async def chat(self, request: dict[str, Any]) -> Any:
        if not request.get("stream"):
            response = await self.client.post("/chat/completions", json=request)
            _raise_for_status(response.status_code, response.content)
            return response.json()
        request = {**request, "stream_options": {"include_usage": True}}
        return EventStreamResponse(
            self._chunks(request), dialect=OpenAIChatDialect.for_request(request)
        )

    async def _chunks(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self.client.stream("POST", "/chat/completions", json=request) as response:
            if response.status_code >= 400:
                _raise_for_status(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise UpstreamError(extra={"upstream_error": chunk["error"].get("type")})
                yield chunk


def _raise_for_status(status: int, body: bytes) -> None:
    """Map an upstream failure to the taxonomy without echoing the upstream's message."""
    if status < 400:
        return
    code = None
    with contextlib.suppress(ValueError, AttributeError):
        code = (json.loads(body).get("error") or {}).get("code")
    extra = {"upstream_status": status, "upstream_code": code}
    if status == 429:
        raise UpstreamRateLimited(extra=extra)
    if status >= 500:
        raise UpstreamUnavailable(extra=extra)
    if status in (400, 404, 413, 422):
        raise InvalidRequest("The upstream model rejected the request.", extra=extra)
    raise UpstreamError(extra=extra)
