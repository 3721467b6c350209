"""Schemathesis against the reference app's own OpenAPI document, over a real server: no 5xx,
and no response that breaks the schema (status codes, content types, bodies, headers).

Every operation is fuzzed, the library's routes (usage, jobs, batches, models, migration
check) as well as the app's own; the operations on one job or batch are also called with
real ids, so their 200 answers (JSON, the event stream, the JSON-lines results) are checked
too, not only their 404s."""

from __future__ import annotations

import time
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aimiddleware.testing import FakeModel
from examples.app import create_app
from tests.live_server import live_server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
AUTH = {"authorization": "Bearer sk-demo-pro"}
LIBRARY_OPERATIONS = {
    "GET /v1/models",
    "GET /v1/models/{model}",
    "POST /v1/migration-check",
    "GET /v1/usage",
    "GET /v1/usage/requests/{request_id}",
    "POST /v1/count_tokens",
    "POST /v1/feedback",
    "POST /v1/jobs",
    "GET /v1/jobs/{id}",
    "DELETE /v1/jobs/{id}",
    "GET /v1/jobs/{id}/events",
    "POST /v1/batches",
    "GET /v1/batches/{id}",
    "DELETE /v1/batches/{id}",
    "GET /v1/batches/{id}/events",
    "GET /v1/batches/{id}/results",
}
# Examples per operation: the box is slow, and the library's routes are many.
EXAMPLES = {"POST /v1/chat/completions": 80, "POST /v1/count_tokens": 80,
            "POST /v1/migration-check": 60, "POST /v1/jobs": 40, "POST /v1/batches": 40}


def _fuzz(operation: Any, url: str, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        case.call_and_validate(base_url=url, headers=AUTH, checks=CHECKS)

    check()


def _ended(client: httpx.Client, location: str) -> str:
    """The id of the job or batch at ``location``, once it has ended."""
    deadline = time.monotonic() + 10
    while True:
        record = client.get(location).json()
        if record["status"] in ("completed", "failed", "cancelled", "expired"):
            return str(record["id"])
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


def test_no_server_error_and_responses_match_the_schema() -> None:
    model = FakeModel("fake-chat", first_token_latency=0, inter_token_delay=0)
    with live_server(create_app(storage="memory://", model=model)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = {op.label: op for op in (r.ok() for r in schema.get_all_operations())}
        assert LIBRARY_OPERATIONS | {"POST /v1/chat/completions"} <= set(operations)
        tried: list[str] = []
        for label, operation in operations.items():
            _fuzz(operation, url, EXAMPLES.get(label, 20))
            tried.append(label)
        assert set(tried) == set(operations)

        # Known models and real ids: the 2xx answers match the schema too (random inputs
        # rarely name a model the registry knows, or a job that exists).
        chat = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5}
        with httpx.Client(base_url=url, headers=AUTH) as client:
            request_id = client.post("/v1/chat/completions", json=chat).headers["x-request-id"]
            job = client.post("/v1/jobs", json={"input": {"text": "hello there"}})
            batch = client.post("/v1/batches", json={"items": [
                {"custom_id": "a", "input": {"text": "one"}},
                {"custom_id": "b", "input": {"documents": ["two", "three"]}},
            ]})
            ids = {"job": _ended(client, job.headers["location"]),
                   "batch": _ended(client, batch.headers["location"])}
        known: list[tuple[str, dict[str, Any]]] = [
            ("POST /v1/chat/completions", {"body": chat}),
            ("POST /v1/chat/completions", {"body": {**chat, "stream": True}}),
            ("POST /v1/count_tokens", {"body": chat}),
            ("GET /v1/usage/requests/{request_id}",
             {"path_parameters": {"request_id": request_id}}),
            ("POST /v1/feedback", {"body": {"request_id": request_id, "rating": 5}}),
            ("GET /v1/models/{model}", {"path_parameters": {"model": "fake-chat"}}),
            ("POST /v1/migration-check", {"body": {
                "path": "/v1/chat/completions", "body": chat,
                "baseline": {"model": "fake-chat-2025-01-15"}, "candidate": {"model": "fake-chat"},
            }}),
            *(
                (label, {"path_parameters": {"id": ids["job" if "/jobs/" in label else "batch"]}})
                for label in sorted(LIBRARY_OPERATIONS)
                if "{id}" in label
            ),
        ]
        for label, parts in known:
            case = operations[label].Case(**parts)
            response = case.call_and_validate(base_url=url, headers=AUTH, checks=CHECKS)
            assert 200 <= response.status_code < 300, (label, response.text)
