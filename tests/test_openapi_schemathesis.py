"""Schemathesis against the reference app's own OpenAPI document, over a real server: no 5xx,
and no response that breaks the schema (status codes, content types, bodies, headers)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
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


@pytest.fixture(scope="module")
def api_schema() -> Iterator[Any]:
    model = FakeModel("fake-chat", first_token_latency=0, inter_token_delay=0)
    with live_server(create_app(storage="memory://", model=model)) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_responses_match_the_schema(case: Any) -> None:
    case.call_and_validate(headers={"authorization": "Bearer sk-demo-pro"}, checks=CHECKS)
