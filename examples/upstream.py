"""Proxy to a real OpenAI-compatible upstream (vLLM, Ollama, a provider) through httpx.

The stack does the rest: the request is admitted and priced before this runs, the usage in
the upstream's answer (JSON ``usage``, or the stream's final usage chunk, which we ask for)
is read on the way out, and a client that goes away cancels this coroutine, which closes the
upstream connection (so the upstream stops generating).

Settings (:meth:`Upstream.from_env`): ``AIMW_UPSTREAM_URL``, ``AIMW_UPSTREAM_API_KEY`` and
``AIMW_UPSTREAM_MAX_CONNECTIONS`` (connections to the upstream at once, default 1000).

Only a whole answer in the form asked for is passed on; anything else (not JSON, a
redirect, a 200 ``{"error": ...}``, a stream answered with JSON or ended without ``[DONE]``
or a ``finish_reason``) is an ``upstream_error`` or a more specific class. Of what the
upstream wrote only its status and error codes from a fixed list reach the client: its
messages can carry its keys, paths and stacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

import httpx
from pydantic_core import PydanticSerializationError, to_json
from starlette.responses import Response

from aimiddleware import (
    AIError,
    EventStreamResponse,
    HTTPStatusError,
    InvalidRequest,
    OpenAIChatDialect,
    StreamResult,
    UpstreamError,
    Usage,
)
from aimiddleware.client import RetryPolicy
from aimiddleware.context import current_or_none
from aimiddleware.errors import upstream_error

__all__ = ["Upstream"]

logger = logging.getLogger("aimiddleware")

_WAITS = RetryPolicy()  # (its server_delay: retry-after-ms, else Retry-After seconds or date)
# httpx's default pool (100) made the 101st concurrent call wait unseen for a connection (up
# to the whole timeout) while holding its admission; the limiter already bounds concurrency.
_MAX_CONNECTIONS = 1000
_KEEPALIVE = 100
# The upstream error codes and types a client may see (OpenAI's, which vLLM and Ollama use).
_CODES = frozenset({
    "context_length_exceeded", "string_above_max_length", "model_not_found",
    "unsupported_parameter", "unsupported_value", "invalid_value",
    "rate_limit_exceeded", "insufficient_quota", "server_error",
})
_TYPES = frozenset({
    "invalid_request_error", "not_found_error", "rate_limit_error", "insufficient_quota",
    "server_error", "timeout_error", "overloaded_error", "api_error",
})


class Upstream:
    def __init__(self, base_url: str, api_key: str = "", timeout: float = 120.0, *,
                 max_connections: int = _MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(max_connections, _KEEPALIVE),
            ),
        )

    @classmethod
    def from_env(cls) -> Upstream | None:
        """``AIMW_UPSTREAM_URL`` (none: no upstream), ``AIMW_UPSTREAM_API_KEY``,
        ``AIMW_UPSTREAM_MAX_CONNECTIONS`` (a positive integer, default 1000)."""
        url = os.environ.get("AIMW_UPSTREAM_URL")
        if not url:
            return None
        limit = _env_int("AIMW_UPSTREAM_MAX_CONNECTIONS", _MAX_CONNECTIONS)
        return cls(url, os.environ.get("AIMW_UPSTREAM_API_KEY", ""), max_connections=limit)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def chat(self, request: dict[str, Any]) -> Any:
        headers = _request_id_header()
        headers["content-type"] = "application/json"
        if not request.get("stream"):
            response = await self.client.post("/chat/completions", content=_json_body(request),
                                              headers=headers)
            _raise_for_status(response)
            return _answer(_completion(response))
        # The upstream's head is awaited before ours is sent, so its refusal (a 429, a
        # rejected request, the upstream down, an answer that is no stream) is the client's
        # status, not an error event after a 200. The usage chunk is always asked for (the
        # stack records it); the client gets it only if it asked.
        options = request.get("stream_options")
        wanted = isinstance(options, dict) and options.get("include_usage") is True
        upstream = {**request, "stream_options": _with_usage(options)}
        built = self.client.build_request("POST", "/chat/completions",
                                          content=_json_body(upstream), headers=headers)
        response = await self.client.send(built, stream=True)
        if not response.is_success or not _is_event_stream(response):
            try:
                await response.aread()
            finally:
                await response.aclose()
            _raise_for_status(response)
            # A 2xx that is no stream: a whole completion (the upstream ignored ``stream``)
            # or a 200 ``{"error": ...}``; either way not the answer asked for.
            raise UpstreamError(
                "The upstream model provider did not answer with an event stream.",
                extra={"upstream_status": response.status_code},
            )
        return EventStreamResponse(
            _Chunks(response, self._chunks(response, wanted)),
            dialect=OpenAIChatDialect.for_request(request),
        )

    async def _chunks(self, response: httpx.Response, wanted: bool) -> AsyncGenerator[Any, None]:
        finished = False  # a finish_reason seen
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = _chunk(data)
                finished = finished or _has_finish_reason(chunk)
                if not wanted:
                    usage = chunk.pop("usage", None)
                    if isinstance(usage, dict):
                        # usage the client did not ask for: recorded, not sent (on its own
                        # chunk, or on the last one with choices, as some upstreams send it)
                        yield StreamResult(usage=Usage.from_openai_chat(usage))
                        if not chunk.get("choices"):
                            continue
                yield chunk
            if not finished:
                # A body closed cleanly mid-answer (an upstream restart, a proxy's cut):
                # ending our stream normally would pass a truncated answer as a success
                # (the dialect even adds its own "stop").
                raise UpstreamError(
                    "The upstream model provider ended the stream before the answer was done.",
                    extra={"upstream_status": response.status_code},
                )
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


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, not {raw!r}")
    return value


def _request_id_header() -> dict[str, str]:
    """Our request id (the client's ``x-request-id`` if it sent a valid one), so the
    upstream's logs can be matched with ours."""
    ctx = current_or_none()
    return {"x-request-id": ctx.request_id} if ctx is not None else {}


def _answer(body: dict[str, Any]) -> Response:
    """The completion as FastAPI would write it (NaN and infinities as ``null``), except
    that a lone surrogate (half an emoji, which some upstreams send: JSON escapes it, UTF-8
    has no bytes for it), on which FastAPI's serializer fails, goes as its escape,
    ``\\ud83d``, as it does in a stream's events. One that also holds NaN is no JSON answer."""
    try:
        return Response(to_json(body, inf_nan_mode="null"), media_type="application/json")
    except PydanticSerializationError:
        pass
    try:
        return Response(_dumps(body), media_type="application/json")
    except ValueError:
        raise UpstreamError("The upstream model provider's answer is not JSON.") from None


def _json_body(request: dict[str, Any]) -> bytes:
    """The upstream request as JSON, written as httpx's ``json=`` would, except for what
    the client's JSON could carry and ours could not. A lone surrogate (half an emoji: JSON
    escapes it, UTF-8 has no bytes for it) goes as its escape, ``\\ud83d``, as the client
    sent it. NaN and infinities (Python's JSON reads ``NaN``, ``Infinity`` and ``1e400``;
    JSON has no such numbers) are the client's ``400``."""
    try:
        return _dumps(request)
    except ValueError:
        raise InvalidRequest(
            "The request body holds a number JSON cannot carry (NaN, Infinity or out of range)."
        ) from None


def _dumps(value: Any) -> bytes:
    """``value`` as compact JSON in UTF-8, a lone surrogate written as its escape
    (``\\ud83d``); ``ValueError`` for NaN or an infinity, which JSON has no number for."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "backslashreplace")


def _with_usage(options: Any) -> dict[str, Any]:
    """The client's ``stream_options`` (vLLM's ``continuous_usage_stats``...) kept, with
    the usage chunk asked for."""
    return {**(options if isinstance(options, dict) else {}), "include_usage": True}


def _is_event_stream(response: httpx.Response) -> bool:
    media: str = response.headers.get("content-type", "").partition(";")[0]
    return media.strip().lower() == "text/event-stream"


def _completion(response: httpx.Response) -> dict[str, Any]:
    """A 2xx body that is a chat completion. HTML (a captive portal), an empty body or a
    200 ``{"error": ...}`` is the upstream's failure, never the client's answer."""
    try:
        body = response.json()
    except ValueError as exc:  # (a JSONDecodeError, or a UnicodeDecodeError)
        raise UpstreamError(
            "The upstream model provider's answer is not JSON.",
            extra={"upstream_status": response.status_code},
        ) from exc
    if isinstance(body, dict) and "error" not in body and isinstance(body.get("choices"), list):
        return body
    raise UpstreamError(extra=_extra(response.status_code, body))


def _chunk(data: str) -> dict[str, Any]:
    """One ``data:`` payload. A line that is not a JSON object, or an error event (OpenAI's
    ``{"error": ...}``, vLLM's ``{"object": "error", ...}``), is the upstream's failure."""
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise UpstreamError(_MALFORMED) from exc
    if not isinstance(chunk, dict):
        raise UpstreamError(_MALFORMED)
    if "error" in chunk or chunk.get("object") == "error":
        kind = _known(chunk, "type", _TYPES)
        raise UpstreamError(extra={"upstream_error": kind} if kind else None)
    return chunk


_MALFORMED = "The upstream model provider sent an event that is not a JSON object."


def _has_finish_reason(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") for c in choices
    )


def _known(body: Any, field: str, allowed: frozenset[str]) -> str | None:
    """``body["error"][field]`` (or ``body[field]``, vLLM's older shape) if it is one of the
    ``allowed`` names: any other text the upstream chose can carry its message."""
    error = body.get("error", body) if isinstance(body, dict) else None
    value = error.get(field) if isinstance(error, dict) else None
    return value if isinstance(value, str) and value in allowed else None


def _extra(status: int, body: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {"upstream_status": status}
    code = _known(body, "code", _CODES)
    if code is not None:
        extra["upstream_code"] = code
    return extra


def _raise_for_status(response: httpx.Response) -> None:
    """Map an upstream failure to the taxonomy without echoing the upstream's message."""
    if response.is_success:
        return
    body = None
    with contextlib.suppress(ValueError):
        body = json.loads(response.content)
    raise _status_error(response.status_code, body, _WAITS.server_delay(response.headers))


def _status_error(status: int, body: Any, wait: float | None) -> AIError:
    """The library's mapping of an upstream status (:func:`aimiddleware.errors.upstream_error`),
    with only well-known codes kept and the upstream's wait (read as the retrying client
    reads it); a 3xx is no answer either (httpx follows no redirects: a misconfigured
    AIMW_UPSTREAM_URL)."""
    extra = _extra(status, body)
    if status in (401, 403):
        # The upstream refused our own key (AIMW_UPSTREAM_API_KEY): every retry fails the
        # same way until the server is fixed. Not the client's 401/403 (its credentials were
        # fine), and upstream_error is retryable: http_error is the taxonomy's one class
        # that is neither.
        logger.warning("the upstream refused our credentials (HTTP %d): check "
                       "AIMW_UPSTREAM_API_KEY", status)
        return HTTPStatusError(
            502, "The upstream model provider refused this server's credentials.", extra=extra
        )
    return upstream_error(status, extra, retry_after=wait)
