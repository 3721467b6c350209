"""Schemathesis against the reference app's own OpenAPI document, over a real server: no 5xx,
and no response that breaks the schema (status codes, content types, bodies, headers)."""

from __future__ import annotations

from typing import Any

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


def test_no_server_error_and_responses_match_the_schema() -> None:
    model = FakeModel("fake-chat", first_token_latency=0, inter_token_delay=0)
    with live_server(create_app(storage="memory://", model=model)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert operations
        tried: list[str] = []
        for operation in operations:

            @settings(
                max_examples=150,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def check(case: Any) -> None:
                case.call_and_validate(base_url=url, headers=AUTH, checks=CHECKS)

            check()
            tried.append(operation.label)
        assert "POST /v1/chat/completions" in tried
