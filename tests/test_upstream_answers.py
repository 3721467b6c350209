"""examples/upstream.py against upstreams that answer badly: a scripted OpenAI-compatible
upstream on a real uvicorn server, the reference app proxying it on another, httpx and the
official ``openai`` SDK as clients. Whatever the upstream does, the client gets a whole
answer or a typed error that carries none of the upstream's text."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from examples.app import create_app
from examples.upstream import Upstream
from tests.live_server import live_server
from tests.test_reference_app import write_test_config

SECRET = "sk-UPSTREAM-SECRET-42 at /srv/engine.py line 7"
PROXY_KEY = "sk-proxy-key-SECRET-7"  # AIMW_UPSTREAM_API_KEY
PRO = {"authorization": "Bearer sk-demo-pro"}
HI = [{"role": "user", "content": "hi"}]
SEEN: list[dict[str, Any]] = []  # what the upstream received: headers and body


def chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    body = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return json.dumps(body)


COMPLETION = {"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
USAGE = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [], "usage": COMPLETION["usage"]}

# What a stream scenario sends after its first delta ("" ends the body there).
STREAMS = {
    "ok": [chunk(finish="stop"), json.dumps(USAGE), "[DONE]"],
    "malformed_line": ['{"id": "x", truncated'],
    "not_an_object": ["42"],
    "error_string": [json.dumps({"error": f"engine crashed: {SECRET}"})],
    "error_null": ['{"error": null}'],
    "error_event": None,  # {"error": {"type": <the request's error_type>, ...}}
    "truncated": [chunk(" answer")],
    "finish_without_done": [chunk(finish="stop")],
    "junk_usage": [chunk(finish="stop"), json.dumps({**USAGE, "usage": {
        "prompt_tokens": "three", "completion_tokens": 1}}), "[DONE]"],
    "huge_stream_usage": [chunk(finish="stop"), json.dumps({**USAGE, "usage": {
        "prompt_tokens": 10**19, "completion_tokens": 1}}), "[DONE]"],
}


async def chat(request: Request) -> Response:
    body = await request.json()
    SEEN.append({"headers": dict(request.headers), "body": body})
    scenario = body.get("scenario", "ok")
    if scenario == "status":
        headers = {"retry-after": body["retry_after"]} if "retry_after" in body else None
        error = {"message": f"failed: {SECRET}", "type": body.get("error_type", "server_error"),
                 "code": body.get("code")}
        return JSONResponse({"error": error}, status_code=body["status"], headers=headers)
    if scenario == "html_200":
        return Response(f"<html>captive portal {SECRET}</html>", media_type="text/html")
    if scenario == "empty_200":
        return Response(b"", media_type="application/json")
    if scenario == "redirect":
        return Response("Moved", status_code=301,
                        headers={"location": "https://elsewhere.invalid/v1/chat/completions"})
    if scenario == "error_200":
        return JSONResponse({"error": {"message": f"loading: {SECRET}", "type": "server_error"}})
    if scenario == "lone_surrogate":  # half an emoji, escaped as JSON allows
        answer = copy.deepcopy(COMPLETION)
        answer["choices"][0]["message"]["content"] = "half \ud83d"
        return Response(json.dumps(answer).encode(), media_type="application/json")
    if scenario == "lone_surrogate_nan":
        return Response(json.dumps({**COMPLETION, "model": "\udc00", "x": math.nan}).encode(),
                        media_type="application/json")
    if scenario == "huge_usage":  # a figure past 2**63
        return JSONResponse({**COMPLETION, "usage": {"prompt_tokens": 10**19,
                                                     "completion_tokens": 1}})
    if scenario == "json_for_stream" or not body.get("stream"):
        return JSONResponse(COMPLETION)
    rest = STREAMS[scenario]
    if rest is None:
        error = {"message": SECRET, "type": body["error_type"], "code": "engine_dead"}
        rest = [json.dumps({"error": error})]

    async def events() -> AsyncIterator[str]:
        for data in [chunk("The"), *rest]:
            yield f"data: {data}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_config(tmp_path_factory)


@pytest.fixture(scope="module")
def proxy_url(config: Path) -> Iterator[str]:
    upstream = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with live_server(upstream) as upstream_url:
        app = create_app(config, storage="memory://",
                         upstream=Upstream(upstream_url + "/v1", PROXY_KEY))
        with live_server(app) as url:
            yield url


def post(url: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    body = {"model": "fake-chat", "messages": HI, **body}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={**PRO, **(headers or {})})


def stream(url: str, **body: Any) -> tuple[httpx.Response, list[Any]]:
    """The response and its events' data (JSON decoded; ``[DONE]`` as is)."""
    r = post(url, stream=True, **body)
    data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
    return r, [d if d == "[DONE]" else json.loads(d) for d in data]


def assert_nothing_leaked(text: str) -> None:
    assert SECRET not in text and "SECRET" not in text and "Traceback" not in text


def assert_typed_502(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 502, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-should-retry"] == "true"
    body: dict[str, Any] = r.json()
    assert body["error"]["code"] == "upstream_error" and body["retryable"] is True
    assert_nothing_leaked(r.text)
    return body


def error_event(events: list[Any]) -> dict[str, Any]:
    """The stream's error event; none of the events before it may be a made-up end."""
    assert events[-1] == "[DONE]"
    error: dict[str, Any] = events[-2]
    assert "error" in error, events
    for event in events[:-2]:
        assert all(c.get("finish_reason") is None for c in event.get("choices", [])), events
    return error


def recorded_finish(url: str, request_id: str) -> str | None:
    for _ in range(50):  # (the usage row is written as the stream ends)
        r = httpx.get(f"{url}/v1/usage/requests/{request_id}", headers=PRO)
        if r.status_code == 200:
            finish: str | None = r.json()["record"]["finish_reason"]
            return finish
        time.sleep(0.02)
    raise AssertionError(f"no usage row for {request_id}")


# -- 1. answers that are not JSON / SSE: a typed, retryable 502 ------------------------------


@pytest.mark.parametrize("scenario", ["html_200", "empty_200", "redirect", "error_200"])
def test_a_body_that_is_no_completion_is_a_typed_502(proxy_url: str, scenario: str) -> None:
    # (was: a 500 internal for HTML, an empty body or a 3xx; the 200 {"error": ...} was
    # returned to the client as a success, its message and all)
    body = assert_typed_502(post(proxy_url, scenario=scenario))
    assert body["upstream_status"] == (301 if scenario == "redirect" else 200)


@pytest.mark.parametrize("scenario", ["malformed_line", "not_an_object", "error_string",
                                      "error_null"])
def test_a_bad_event_ends_the_stream_with_a_typed_error(proxy_url: str, scenario: str) -> None:
    # (was: an internal error event, from json.loads or chunk["error"].get)
    r, events = stream(proxy_url, scenario=scenario)
    assert r.status_code == 200
    error = error_event(events)
    assert error["error"]["code"] == "upstream_error" and error["retryable"] is True
    assert "upstream_error" not in error  # (no type the client may see)
    assert_nothing_leaked(r.text)


# -- 2. a stream the upstream did not finish is no success -----------------------------------


def test_a_stream_cut_short_cleanly_is_an_error_not_a_stop(proxy_url: str) -> None:
    # The upstream closed the body after two deltas: no finish_reason, no [DONE]. It was
    # passed on with a made-up "stop" chunk and recorded as a stop.
    r, events = stream(proxy_url, scenario="truncated")
    assert r.status_code == 200
    assert error_event(events)["error"]["code"] == "upstream_error"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-2])
    assert text == "The answer"  # (what came is still sent)
    assert recorded_finish(proxy_url, r.headers["x-request-id"]) == "error"


def test_a_finish_reason_without_done_still_ends_cleanly(proxy_url: str) -> None:
    r, events = stream(proxy_url, scenario="finish_without_done")
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert recorded_finish(proxy_url, r.headers["x-request-id"]) == "stop"


@pytest.mark.parametrize("scenario", ["json_for_stream", "error_200", "redirect"])
def test_a_stream_answered_with_json_is_a_typed_502(proxy_url: str, scenario: str) -> None:
    # (was: a 200 stream with a made-up "stop" and nothing else: the JSON has no data: line)
    # Known before our head is sent, so it is the status, as an upstream 429 is.
    assert_typed_502(post(proxy_url, stream=True, scenario=scenario))


def test_a_whole_stream_still_passes(proxy_url: str) -> None:
    r, events = stream(proxy_url, stream_options={"include_usage": True})
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["usage"]["total_tokens"] == 4
    assert recorded_finish(proxy_url, r.headers["x-request-id"]) == "stop"


# -- 4. only the upstream's codes from a fixed list reach the client ---------------------------


@pytest.mark.parametrize(("code", "kept"), [(SECRET, False), ("context_length_exceeded", True)])
def test_only_known_upstream_codes_are_passed_on(proxy_url: str, code: str, kept: bool) -> None:
    r = post(proxy_url, scenario="status", status=400, code=code)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert r.json().get("upstream_code") == (code if kept else None)
    assert_nothing_leaked(r.text)


@pytest.mark.parametrize(("kind", "kept"), [(SECRET, False), ("server_error", True)])
def test_only_known_error_event_types_are_passed_on(proxy_url: str, kind: str, kept: bool) -> None:
    r, events = stream(proxy_url, scenario="error_event", error_type=kind)
    error = error_event(events)
    assert error["error"]["code"] == "upstream_error"
    assert error.get("upstream_error") == (kind if kept else None)
    assert_nothing_leaked(r.text)


# -- 5. statuses mapped as the taxonomy maps an SDK's -----------------------------------------


@pytest.mark.parametrize("status", [408, 504])
def test_an_upstream_timeout_is_upstream_timeout(proxy_url: str, status: int) -> None:
    # (was: a 504 was upstream_unavailable 503, a 408 a 502)
    r = post(proxy_url, scenario="status", status=status)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert_nothing_leaked(r.text)


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_503_keeps_its_retry_after(proxy_url: str, stream: bool) -> None:
    # (was: dropped; clients backed off blind and hammered the overloaded upstream)
    r = post(proxy_url, scenario="status", status=503, retry_after="3", stream=stream)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert r.headers["retry-after"] == "3" and r.headers["retry-after-ms"] == "3000"


@pytest.mark.parametrize("status", [401, 403])
def test_an_upstream_refusing_our_key_is_not_retried(proxy_url: str, status: int) -> None:
    # A wrong AIMW_UPSTREAM_API_KEY: every retry fails alike. It was a retryable 502, so the
    # SDK sent each call three times.
    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="sk-demo-pro", max_retries=2)
    SEEN.clear()
    with client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="fake-chat", messages=HI,  # type: ignore[arg-type]
            extra_body={"scenario": "status", "status": status},
        )
    assert len(SEEN) == 1
    response = info.value.response
    assert response.status_code == 502  # (not the client's 401/403: its key was fine)
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["retryable"] is False and response.json()["upstream_status"] == status
    assert response.json()["error"]["type"] == "server_error"  # (ours, not the caller's)
    assert_nothing_leaked(response.text)
    assert PROXY_KEY not in response.text


# -- 6. the request id goes upstream; the client's stream_options are kept ---------------------


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_id_is_forwarded(proxy_url: str, stream: bool) -> None:
    SEEN.clear()
    r = post(proxy_url, headers={"x-request-id": "trace-upstream-1"}, stream=stream)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-upstream-1"
    assert SEEN[-1]["headers"]["x-request-id"] == "trace-upstream-1"
    r = post(proxy_url, stream=stream)  # none sent: ours, the one the client is told
    assert SEEN[-1]["headers"]["x-request-id"] == r.headers["x-request-id"]


def test_the_clients_stream_options_are_merged(proxy_url: str) -> None:
    SEEN.clear()
    options = {"include_usage": False, "continuous_usage_stats": True}
    r, events = stream(proxy_url, stream_options=options)
    assert r.status_code == 200
    assert SEEN[-1]["body"]["stream_options"] == {"include_usage": True,
                                                  "continuous_usage_stats": True}
    assert all("usage" not in e for e in events[:-1])  # (still not sent: not asked for)


# -- 7. a client body JSON reads but UTF-8 JSON cannot carry ---------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_goes_upstream_as_the_clients_escape(proxy_url: str,
                                                              stream: bool) -> None:
    # (was: a 500: httpx's json= encodes to UTF-8, which has no bytes for half an emoji)
    SEEN.clear()
    head = f'{{"model": "fake-chat", "stream": {json.dumps(stream)}, '
    raw = (head + '"messages": [{"role": "user", "content": "half \\ud83d"}], '
           '"user": "\\udc00"}').encode()
    r = httpx.post(proxy_url + "/v1/chat/completions", content=raw,
                   headers={**PRO, "content-type": "application/json"})
    assert r.status_code == 200, r.text
    body = SEEN[-1]["body"]
    assert body["messages"][0]["content"] == "half \ud83d" and body["user"] == "\udc00"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-1e400"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_number_json_cannot_carry_is_the_clients_400(proxy_url: str, number: str,
                                                       stream: bool) -> None:
    # (was: a 500: httpx's json= refuses NaN and infinities, which Python's JSON reads)
    SEEN.clear()
    head = f'{{"model": "fake-chat", "stream": {json.dumps(stream)}, '
    raw = head + '"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": '
    raw += number + "}}"
    r = httpx.post(proxy_url + "/v1/chat/completions", content=raw.encode(),
                   headers={**PRO, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"]["code"] == "invalid_request" and SEEN == []


# -- 8. a usage figure no call can have ------------------------------------------------------


def test_an_upstream_usage_figure_past_any_context_is_not_charged(proxy_url: str) -> None:
    # (was: charged whole: on memory the tenant's 200,000 tokens a minute were gone, its next
    # request a 429; on Redis the counter wrapped to -2**63, no limit left for the window)
    free = {"authorization": "Bearer sk-demo-free-2"}
    r = post(proxy_url, headers=free, scenario="huge_usage", max_tokens=5)
    assert r.status_code == 200 and r.headers["x-usage-input-tokens"] == "0"
    assert r.headers["x-usage-output-tokens"] == "1"
    again = post(proxy_url, headers=free, max_tokens=5)
    assert again.status_code == 200, again.text
    assert int(again.headers["x-ratelimit-remaining-tokens"]) > 199_000


# -- 9. a JSON answer FastAPI's serializer cannot write --------------------------------------


def test_a_lone_surrogate_in_a_json_answer_goes_out_escaped(proxy_url: str) -> None:
    # (was: a 500, PydanticSerializationError: UTF-8 has no bytes for half an emoji; a
    # stream's events already carried it escaped)
    r = post(proxy_url, scenario="lone_surrogate")
    assert r.status_code == 200, r.text
    assert b'"content":"half \\ud83d"' in r.content
    assert r.json()["choices"][0]["message"]["content"] == "half \ud83d"
    assert r.headers["x-usage-total-tokens"] == "4"
    # with a NaN too it is no JSON answer: the retryable 502
    assert_typed_502(post(proxy_url, scenario="lone_surrogate_nan"))


@pytest.mark.parametrize("scenario", ["junk_usage", "huge_stream_usage"])
def test_a_streams_usage_chunk_with_junk_counts_reads_them_as_0(proxy_url: str,
                                                                scenario: str) -> None:
    # (was: the stream dialect read the chunk with int() and Usage(): "three" ended a whole
    # answer with an error event; 10**19 was charged, past the bound JSON answers keep)
    r, events = stream(proxy_url, scenario=scenario, stream_options={"include_usage": True})
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1]), events
    rid = r.headers["x-request-id"]
    assert recorded_finish(proxy_url, rid) == "stop"
    row = httpx.get(f"{proxy_url}/v1/usage/requests/{rid}", headers=PRO).json()
    assert row["record"]["usage"]["input_tokens"] == 0
    assert row["record"]["usage"]["output_tokens"] == 1
