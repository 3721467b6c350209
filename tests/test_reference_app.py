"""The reference app end to end, as its users meet it: a real uvicorn server, the official
``openai`` SDK unchanged, httpx and httpx-sse."""

from __future__ import annotations

import functools
import gc
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest
from httpx_sse import connect_sse

from aimiddleware.client import AsyncRetryTransport, RetryTransport
from aimiddleware.testing import FakeModel
from examples.app import create_app
from examples.settings import load_settings, principal_of_key
from tests.live_server import live_server

CONFIG = (Path(__file__).resolve().parent.parent / "examples" / "config.toml").read_text()

# A test tier file: per-second limits so Retry-After is short, a tiny daily budget for "broke".
TEST_TIERS = """
[tiers.free]
requests = "3/second"
tokens = "200000/minute"
concurrency = 4
output_estimate = 64

[tiers.pro]
requests = "600/minute"

[tiers.broke]
requests = "600/minute"
cost = "0.000001/day"
output_estimate = 64

[keys]
"sk-demo-pro" = "pro"
"sk-broke" = "broke"
"sk-demo-free" = "free"
"sk-demo-free-2" = "free"
"sk-free-user" = "free"
"sk-free-retrying" = "free"
"""


def write_test_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference app's config.toml with the tests' tiers and keys."""
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_text(CONFIG.split("# Tiers.")[0] + TEST_TIERS)
    return path


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = write_test_config(tmp_path_factory)
    model = FakeModel("fake-chat", first_token_latency=0, inter_token_delay=0)
    with live_server(create_app(path, storage="memory://", model=model)) as url:
        yield url


_clients: list[openai.OpenAI] = []


def sdk(base_url: str, key: str = "sk-demo-pro", **kw: object) -> openai.OpenAI:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, **kw)  # type: ignore[arg-type]
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


HI = [{"role": "user", "content": "Say hello to the reference app."}]


def test_config_file_loads_and_keys_are_hashed() -> None:
    settings = load_settings(Path(__file__).resolve().parent.parent / "examples" / "config.toml")
    assert set(settings.tiers) == {"free", "pro"}
    assert settings.tier_of == {
        principal_of_key("sk-demo-pro"): "pro",
        principal_of_key("sk-demo-free"): "free",
        principal_of_key("sk-demo-free-2"): "free",
    }
    assert "sk-demo-pro" not in json.dumps(list(settings.tier_of))


def test_the_running_app_keeps_its_startup_objects_out_of_collections(base_url: str) -> None:
    """A full collection walks what was made since startup, not the ~70,000 objects (the
    modules, the tokenizer, the app) that live as long as the process (~30 ms per walk)."""
    assert httpx.get(base_url + "/v1/models").status_code == 200  # (it is serving)
    assert gc.get_freeze_count() > 50_000
    assert len(gc.get_objects()) < gc.get_freeze_count() // 2


def test_an_unknown_api_key_is_refused_not_given_a_quota(base_url: str) -> None:
    # Each made-up key was a tenant of its own, with a fresh free-tier quota.
    for key in ("sk-made-up-1", "sk-made-up-2"):
        r = httpx.post(base_url + "/v1/chat/completions",
                       headers={"authorization": f"Bearer {key}"},
                       json={"model": "fake-chat", "messages": HI, "max_tokens": 5})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "authentication"
        assert key not in r.text
    with pytest.raises(openai.AuthenticationError):
        sdk(base_url, key="sk-made-up-3", max_retries=0).chat.completions.create(
            model="fake-chat", messages=HI, max_tokens=5)
    # Without a key: the free tier, by address.
    r = httpx.get(base_url + "/v1/models")
    assert r.status_code == 200


def test_completion_through_the_openai_sdk(base_url: str) -> None:
    raw = sdk(base_url).chat.completions.with_raw_response.create(
        model="fake-chat", messages=HI, max_tokens=20, seed=7
    )
    out = raw.parse()
    assert out.model == "fake-chat-2026-06-01"  # the alias, pinned to its snapshot
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens <= 20
    assert raw.headers["x-model"] == "fake-chat"
    assert raw.headers["x-model-version"] == "fake-chat-2026-06-01"
    assert int(raw.headers["x-usage-output-tokens"]) == out.usage.completion_tokens
    assert raw.headers["x-ratelimit-limit-requests"] == "600"
    again = sdk(base_url).chat.completions.create(
        model="fake-chat", messages=HI, max_tokens=20, seed=7
    )
    assert again.choices[0].message.content == out.choices[0].message.content  # seeded


def test_streaming_with_usage_through_the_openai_sdk(base_url: str) -> None:
    stream = sdk(base_url).chat.completions.create(
        model="fake-chat", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    # one usage chunk: the model's own, not a second one added by the dialect
    assert [c for c in chunks if c.usage is not None] == [final]
    assert len({c.id for c in chunks}) == 1
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


def test_rate_limited_is_retried_after_retry_after(base_url: str) -> None:
    attempts: list[int] = []

    def count(response: httpx.Response) -> None:
        attempts.append(response.status_code)

    client = sdk(
        base_url,
        key="sk-free-user",
        max_retries=3,
        http_client=httpx.Client(event_hooks={"response": [count]}),  # closed with the SDK
    )
    # The 4th in the same second is refused (3/second); the SDK waits Retry-After, retries.
    # (A machine that stalls for a second between two calls lets the window slide: up to
    # ten calls, until one was refused.)
    for _ in range(10):
        client.chat.completions.create(model="fake-chat", messages=HI, max_tokens=5)
        if 429 in attempts:
            break
    assert 429 in attempts and attempts[-1] == 200


def test_rate_limit_429_carries_the_headers(base_url: str) -> None:
    statuses = []
    for _ in range(20):  # 3/second: the 4th in a second (allowing for a stalled machine)
        r = httpx.post(
            base_url + "/v1/chat/completions",
            headers={"authorization": "Bearer sk-demo-free"},
            json={"model": "fake-chat", "messages": HI, "max_tokens": 5},
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-should-retry"] == "true"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.json()["error"]["code"] == "rate_limited" and r.json()["dimension"] == "requests"


def test_quota_exceeded_is_not_retried_by_the_sdk(base_url: str) -> None:
    attempts: list[int] = []
    client = sdk(
        base_url,
        key="sk-broke",
        max_retries=3,
        http_client=httpx.Client(event_hooks={"response": [lambda r: attempts.append(1)]}),
    )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="fake-chat", messages=HI, max_tokens=5)
    assert info.value.code == "quota_exceeded" and info.value.type == "insufficient_quota"
    assert len(attempts) == 1


def test_idempotent_replay(base_url: str) -> None:
    body = {"model": "fake-chat", "messages": HI, "max_tokens": 10}
    headers = {"authorization": "Bearer sk-demo-pro", "idempotency-key": "retry-me-1"}
    first = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers)
    second = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    other = httpx.post(
        base_url + "/v1/chat/completions", json={**body, "max_tokens": 11}, headers=headers
    )
    assert other.status_code == 422


def test_streamed_replay_is_the_same_event_stream(base_url: str) -> None:
    body = {"model": "fake-chat", "messages": HI, "stream": True}
    headers = {"authorization": "Bearer sk-demo-pro", "idempotency-key": "stream-1"}

    def events() -> tuple[list[str], httpx.Headers]:
        with (
            httpx.Client() as client,
            connect_sse(
                client, "POST", base_url + "/v1/chat/completions", json=body, headers=headers
            ) as source,
        ):
            return [e.data for e in source.iter_sse()], source.response.headers

    first, _ = events()
    second, replay_headers = events()
    assert first == second and first[-1] == "[DONE]"
    assert replay_headers["idempotent-replayed"] == "true"


def test_models_count_tokens_usage_and_versions(base_url: str) -> None:
    auth = {"authorization": "Bearer sk-demo-pro"}
    models = sdk(base_url).models.list()
    ids = {m.id for m in models.data}
    assert "fake-chat-2026-06-01" in ids
    count = httpx.post(
        base_url + "/v1/count_tokens",
        headers=auth,
        json={"model": "fake-chat-2026-06-01", "messages": HI},
    ).json()
    assert count["exact"] is True and count["input_tokens"] > 0
    sdk(base_url).chat.completions.create(model="fake-chat", messages=HI)  # (usage to list)
    usage = httpx.get(base_url + "/v1/usage", headers=auth).json()
    assert usage["totals"]["requests"] >= 1
    retired = httpx.post(
        base_url + "/v1/chat/completions",
        headers=auth,
        json={"model": "fake-chat-2024-03-01", "messages": HI},
    )
    assert retired.status_code == 410 and retired.json()["error"]["code"] == "model_retired"
    old = httpx.post(
        base_url + "/v1/chat/completions",
        headers={**auth, "api-version": "2025-01-01"},
        json={"model": "fake-chat", "messages": HI, "max_tokens": 3},
    )
    assert old.status_code == 200 and old.headers["deprecation"].startswith("@")
    bad = httpx.post(
        base_url + "/v1/chat/completions",
        headers={**auth, "api-version": "1999"},
        json={"model": "fake-chat", "messages": HI},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_api_version"


def test_head_on_the_models_routes_answers_as_get_without_a_body(base_url: str) -> None:
    # HEAD /v1/models was a 405 (Allow: GET) and HEAD /v1/models/{id} a 404, where every
    # other GET route (Starlette's) answers HEAD.
    auth = {"authorization": "Bearer sk-demo-pro"}
    for path in ("/v1/models", "/v1/models/fake-chat-2026-06-01"):
        get = httpx.get(base_url + path, headers=auth)
        head = httpx.head(base_url + path, headers=auth)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == str(len(get.content))
    missing = httpx.head(base_url + "/v1/models/nope", headers=auth)
    assert missing.status_code == 404
    refused = httpx.delete(base_url + "/v1/models", headers=auth)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"


def test_jobs_submit_and_poll(base_url: str) -> None:
    auth = {"authorization": "Bearer sk-demo-pro"}
    r = httpx.post(
        base_url + "/v1/jobs", headers=auth, json={"input": {"documents": ["one", "two"]}}
    )
    assert r.status_code == 202
    job_url = (
        base_url + r.headers["location"]
        if r.headers["location"].startswith("/")
        else r.headers["location"]
    )
    for _ in range(100):
        job = httpx.get(job_url, headers=auth).json()
        if job["status"] == "completed":
            break
        import time

        time.sleep(0.05)
    assert job["status"] == "completed" and len(job["result"]["summaries"]) == 2
    assert httpx.get(job_url, headers={"authorization": "Bearer sk-demo-free-2"}).status_code == 404


def test_bad_input_is_typed(base_url: str) -> None:
    auth = {"authorization": "Bearer sk-demo-pro"}
    cases = [
        (b"{not json", 422),
        (json.dumps({"model": "fake-chat", "messages": []}).encode(), 422),
        (json.dumps({"model": "nope", "messages": HI}).encode(), 404),
        (json.dumps({"model": "fake-chat", "messages": HI, "max_tokens": -1}).encode(), 422),
        # not coerced: OpenAI's types are strict
        (json.dumps({"model": "fake-chat", "messages": HI, "max_tokens": "5"}).encode(), 422),
        (json.dumps({"model": "fake-chat", "messages": HI, "max_tokens": True}).encode(), 422),
        (json.dumps({"model": "fake-chat", "messages": HI, "stream": "yes"}).encode(), 422),
        (b'{"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], '
         b'"temperature": NaN}', 422),
    ]
    for raw, status in cases:
        r = httpx.post(
            base_url + "/v1/chat/completions",
            content=raw,
            headers={**auth, "content-type": "application/json"},
        )
        assert r.status_code == status, (raw, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    r = httpx.post(
        base_url + "/v1/chat/completions",
        headers={**auth, "idempotency-key": ""},
        json={"model": "fake-chat", "messages": HI},
    )
    assert r.status_code == 400


def test_a_stream_without_the_usage_chunk_is_still_accounted(base_url: str) -> None:
    auth = {"authorization": "Bearer sk-demo-pro"}
    body = {"model": "fake-chat", "messages": HI, "stream": True, "max_tokens": 30}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, headers=auth) as r:
        request_id = r.headers["x-request-id"]
        text = r.read().decode()
    assert '"usage"' not in text.split("data: [DONE]")[0].rsplit("data:", 2)[-1]
    record = httpx.get(base_url + f"/v1/usage/requests/{request_id}", headers=auth).json()
    usage = record["record"]["usage"]
    assert usage["output_tokens"] > 0 and usage["input_tokens"] > 0
    assert record["record"]["estimated_cost"] not in (None, "0")


def test_deeply_nested_json_is_a_400_not_a_retryable_500(base_url: str) -> None:
    deep = b'{"model": "fake-chat", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    for path in ("/v1/chat/completions", "/v1/count_tokens", "/v1/jobs"):
        r = httpx.post(
            base_url + path,
            content=deep,
            headers={"content-type": "application/json", "authorization": "Bearer sk-demo-pro"},
        )
        assert r.status_code in (400, 422), (path, r.status_code, r.text[:200])
        assert r.headers["x-should-retry"] == "false"


def test_wrong_method_is_405_with_allow(base_url: str) -> None:
    r = httpx.get(base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_count_tokens_prices_the_resolved_snapshot(base_url: str) -> None:
    r = httpx.post(
        base_url + "/v1/count_tokens",
        headers={"authorization": "Bearer sk-demo-pro"},
        json={"model": "fake-chat", "messages": HI},
    )
    assert r.json()["estimated_cost"] not in (None, "0")


def test_batch_results_url_resolves_against_the_batch_url(base_url: str) -> None:
    auth = {"authorization": "Bearer sk-demo-pro"}
    items = [{"custom_id": f"c{i}", "input": {"text": f"doc {i}"}} for i in range(3)]
    r = httpx.post(base_url + "/v1/batches", headers=auth, json={"items": items})
    assert r.status_code == 202
    batch_url = httpx.URL(base_url).join(r.headers["location"])
    for _ in range(200):
        batch = httpx.get(batch_url, headers=auth).json()
        if batch["results_url"]:
            break
        time.sleep(0.05)
    results = httpx.get(batch_url.join(batch["results_url"]), headers=auth)
    assert results.status_code == 200
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["c0", "c1", "c2"]


def test_job_usage_events_are_json_objects(base_url: str) -> None:
    auth = {"authorization": "Bearer sk-demo-pro"}
    r = httpx.post(base_url + "/v1/jobs", headers=auth, json={"input": {"documents": ["a"]}})
    job_url = httpx.URL(base_url).join(r.headers["location"])
    with (
        httpx.Client() as client,
        connect_sse(client, "GET", str(job_url) + "/events", headers=auth) as source,
    ):
        events = []
        for event in source.iter_sse():
            events.append(event)
            if event.event.startswith("job.") and event.event.split(".")[1] in (
                "completed",
                "failed",
                "cancelled",
                "expired",
            ):
                break
    usage_events = [json.loads(e.data) for e in events if e.event == "job.usage"]
    assert usage_events and all(isinstance(e["usage"], dict) for e in usage_events if e["usage"])
    final = json.loads(events[-1].data)
    assert final["status"] == "completed" and final["cost"] not in (None, "0")


def test_bad_job_input_is_a_typed_400_at_submission(base_url: str) -> None:
    # Not a 202 and a job that fails later as a retryable "internal" error.
    auth = {"authorization": "Bearer sk-demo-pro"}
    for body, param in [
        ({}, "input"),
        ({"input": "hi"}, "input"),
        ({"input": [1, 2]}, "input"),
        ({"input": {"documents": 5}}, "input.documents"),
        ({"input": {"documents": ["a"], "text": "b"}}, "input"),
    ]:
        r = httpx.post(base_url + "/v1/jobs", headers=auth, json=body)
        assert r.status_code == 400, body
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == param, body
        assert r.json()["retryable"] is False
    items = [{"custom_id": "ok", "input": {"text": "a"}}, {"custom_id": "bad", "input": {}}]
    r = httpx.post(base_url + "/v1/batches", headers=auth, json={"items": items})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items.1.input"


def test_polling_a_job_charges_the_caller_nothing(base_url: str) -> None:
    # A job's JSON and events carry the job's usage: the usage layer took it for each
    # poll's own, recording it again (and charging the caller's token limits) every time.
    auth = {"authorization": "Bearer sk-demo-pro"}
    before = httpx.get(base_url + "/v1/usage", headers=auth).json()["totals"]
    r = httpx.post(base_url + "/v1/jobs", headers=auth, json={"input": {"text": "a b c"}})
    job_url = str(httpx.URL(base_url).join(r.headers["location"]))
    with (
        httpx.Client() as client,
        connect_sse(client, "GET", job_url + "/events", headers=auth) as source,
    ):
        kinds = [event.event for event in source.iter_sse()]
    assert kinds[-1] == "job.completed" and "job.usage" in kinds
    for _ in range(2):
        poll = httpx.get(job_url, headers=auth)
        assert poll.json()["usage"]["total_tokens"] > 0  # the job's own usage, shown
        assert "x-usage-input-tokens" not in poll.headers
    job = poll.json()
    after = httpx.get(base_url + "/v1/usage", headers=auth).json()["totals"]
    # One row: the finished job, with its usage and cost (the submission called no model:
    # no row of its own, as the polls).
    assert after == {
        **before,
        "requests": before["requests"] + 1,
        **{k: before[k] + job["usage"][k] for k in ("input_tokens", "output_tokens",
                                                   "total_tokens")},
        "estimated_cost": str(Decimal(before["estimated_cost"]) + Decimal(job["cost"])),
    }
    record = httpx.get(f"{base_url}/v1/usage/requests/{job['id']}", headers=auth).json()
    assert record["record"]["model"] == "fake-chat-2026-06-01"
    assert record["record"]["finish_reason"] == "stop"
    assert record["record"]["raw_finish_reason"] == "completed"


def test_an_idempotency_key_is_bound_to_the_api_version(base_url: str) -> None:
    # The same key and body under another api-version replayed the first version's answer,
    # labelled with the second version (and its Deprecation header).
    headers = {"authorization": "Bearer sk-demo-pro", "idempotency-key": "versioned-1"}
    body = {"model": "fake-chat", "messages": HI, "max_tokens": 5}
    url = base_url + "/v1/chat/completions"
    first = httpx.post(url, json=body, headers={**headers, "api-version": "2026-06-01"})
    assert first.status_code == 200
    again = httpx.post(url, json=body, headers={**headers, "api-version": "2026-06-01"})
    assert again.headers["idempotent-replayed"] == "true"
    other = httpx.post(url, json=body, headers={**headers, "api-version": "2025-01-01"})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_stream_the_model_rejects_is_a_4xx_not_a_200(base_url: str) -> None:
    # The model validated the request inside the stream, after the 200 head: an error event,
    # and the whole reservation charged for a call that never happened.
    body = {"model": "fake-chat", "messages": HI, "stream": True, "max_tokens": 50, "n": 2}
    r = httpx.post(base_url + "/v1/chat/completions", json=body,
                   headers={"authorization": "Bearer sk-demo-pro"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"]["code"] == "validation_failed"


def test_a_content_block_with_members_of_the_wrong_type_is_counted_not_a_500(
    base_url: str,
) -> None:
    # (was: a 500 from the chat route, whose model counts the prompt: the tally looked a
    # block's type up in a set (TypeError: unhashable) and called .get on its functionCall
    # (AttributeError, also a 500 from count_tokens, which refuses only a TypeError))
    auth = {"authorization": "Bearer sk-demo-pro"}
    for block in ({"type": [1], "text": "hi"}, {"type": {"a": 1}}, {"functionCall": [1]},
                  {"functionCall": "f"}, {"type": "tool_use", "functionCall": None}):
        body = {"model": "fake-chat", "messages": [{"role": "user", "content": [block]}],
                "max_tokens": 3}
        for path in ("/v1/chat/completions", "/v1/count_tokens"):
            r = httpx.post(base_url + path, json=body, headers=auth)
            assert r.status_code == 200, (block, path, r.text)
        assert r.json()["input_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_content_nested_past_the_bound_is_a_400_on_the_chat_route_too(
    base_url: str, stream: bool
) -> None:
    # count_tokens refused it (a 400) but the chat route's model counts the prompt too, and
    # the counter's TypeError was a 500 there.
    block: dict[str, object] = {"type": "tool_result", "content": "x"}
    for _ in range(60):
        block = {"type": "tool_result", "content": [block]}
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": [block]}],
            "max_tokens": 3, "stream": stream}
    auth = {"authorization": "Bearer sk-demo-pro"}
    for path in ("/v1/chat/completions", "/v1/count_tokens"):
        r = httpx.post(base_url + path, json=body, headers=auth)
        assert r.status_code == 400, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert "nested more than 32 deep" in r.json()["detail"]


# -- the SDK with the retrying client (aimiddleware.client) as its transport ----------------------
# In the SDK's own kind of client, httpx2 (openai 3's http_client= is one), and in legacy httpx.



def retrying_sdk(
    base_url: str, key: str, http: ModuleType, sync: bool, seen: list[int]
) -> openai.OpenAI | openai.AsyncOpenAI:
    """The SDK on ``http``'s client around the retrying transport, ``seen`` each attempt's
    status (SDK retries off: one retry layer)."""
    if sync:

        class Spy(http.HTTPTransport):
            def handle_request(self, request: Any) -> Any:
                response = super().handle_request(request)
                seen.append(response.status_code)
                return response

        client = http.Client(transport=RetryTransport(Spy(), max_retries=3))
        return openai.OpenAI(base_url=base_url + "/v1", api_key=key, http_client=client,
                             max_retries=0)

    class AsyncSpy(http.AsyncHTTPTransport):
        async def handle_async_request(self, request: Any) -> Any:
            response = await super().handle_async_request(request)
            seen.append(response.status_code)
            return response

    aclient = http.AsyncClient(transport=AsyncRetryTransport(AsyncSpy(), max_retries=3))
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, http_client=aclient,
                              max_retries=0)


class Chat:
    """One SDK client, sync (called in a thread) or async, and the statuses it was sent."""

    def __init__(self, base_url: str, key: str, http: ModuleType, sync: bool) -> None:
        self.seen: list[int] = []
        self.client = retrying_sdk(base_url, key, http, sync, self.seen)

    async def create(self, **body: Any) -> Any:
        """A chat completion; a stream's chunks, all of them."""
        body = {"model": "fake-chat", "messages": HI, "max_tokens": 5, **body}
        client = self.client
        if isinstance(client, openai.AsyncOpenAI):
            answer = await client.chat.completions.create(**body)
            return [chunk async for chunk in answer] if body.get("stream") else answer
        answer = await anyio.to_thread.run_sync(functools.partial(
            client.chat.completions.create, **body))
        return await anyio.to_thread.run_sync(list, answer) if body.get("stream") else answer

    async def __aenter__(self) -> Chat:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if isinstance(self.client, openai.AsyncOpenAI):
            await self.client.close()
        else:
            self.client.close()


@pytest.fixture(
    params=[(httpx2, True), (httpx2, False), (httpx, True), (httpx, False)],
    ids=["httpx2-sync", "httpx2-async", "httpx-sync", "httpx-async"],
)
def chat_as(base_url: str, request: pytest.FixtureRequest) -> Callable[[str], Chat]:
    """A :class:`Chat` for an API key, on each module's client, sync and async."""
    return functools.partial(Chat, base_url, http=request.param[0], sync=request.param[1])


async def test_the_retrying_client_completes_and_streams_through_the_sdk(
    chat_as: Callable[[str], Chat],
) -> None:
    async with chat_as("sk-demo-pro") as chat:
        out = await chat.create(max_tokens=12)
        chunks = await chat.create(stream=True, stream_options={"include_usage": True})
    assert out.choices[0].message.content and out.usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chat.seen == [200, 200]


async def test_the_retrying_client_retries_a_rate_limit_through_the_sdk(
    chat_as: Callable[[str], Chat],
) -> None:
    async with chat_as("sk-free-retrying") as chat:
        # the 4th in the same second is refused (3/second): the transport waits Retry-After
        # and sends it again (ten calls at most, for a machine that stalls between calls)
        for _ in range(10):
            out = await chat.create()
            if 429 in chat.seen:
                break
    assert 429 in chat.seen and chat.seen[-1] == 200 and out.choices[0].message.content


async def test_the_retrying_client_does_not_retry_a_spent_quota_through_the_sdk(
    chat_as: Callable[[str], Chat],
) -> None:
    async with chat_as("sk-broke") as chat:
        with pytest.raises(openai.RateLimitError) as info:
            await chat.create()
    assert info.value.code == "quota_exceeded" and chat.seen == [429]
