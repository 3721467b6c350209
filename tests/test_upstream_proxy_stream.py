"""examples/upstream.py's streaming proxy reports the usage it asks for however the upstream
sends it. A scripted upstream (httpx's MockTransport): no server here puts usage on a chunk
with choices. The proxy against a real upstream is in ``test_reference_proxy.py``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from aimiddleware import StreamResult, Usage
from examples.upstream import Upstream

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


class Body(httpx.AsyncByteStream):
    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.closed = True


def upstream(chunks: list[dict[str, Any]]) -> tuple[Upstream, Body]:
    body = Body(chunks)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    up = Upstream("http://upstream/v1")
    up.client = httpx.AsyncClient(base_url="http://upstream/v1",
                                  transport=httpx.MockTransport(handler))
    return up, body


def delta(text: str, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            **extra}


REQUEST = {"model": "m", "messages": [], "stream": True}


async def test_usage_on_a_chunk_with_choices_is_still_reported() -> None:
    # Some OpenAI-compatible upstreams put the usage on the last chunk with choices. The
    # client did not ask for it: it was popped from the chunk and dropped, never recorded.
    up, body = upstream([delta("a"), delta("b", usage=USAGE)])
    resp = await up.chat(REQUEST)
    items = [item async for item in resp.iterator]  # type: ignore[attr-defined]
    results = [i for i in items if isinstance(i, StreamResult)]
    assert results == [StreamResult(usage=Usage.from_openai_chat(USAGE))]
    assert all("usage" not in i for i in items if isinstance(i, dict))
    assert body.closed
