"""The taxonomy rendered exactly, and foreign exceptions mapped to it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from aimiddleware import errors as E
from aimiddleware.errors import (
    AIError,
    ExceptionMapper,
    error_headers,
    problem_body,
    render_problem,
)


def all_error_classes() -> list[type[AIError]]:
    found: list[type[AIError]] = []
    stack: list[type[AIError]] = [AIError]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub.__module__ == "aimiddleware.errors":
                found.append(sub)
                stack.append(sub)
    return sorted(found, key=lambda c: c.__name__)


def instantiate(cls: type[AIError]) -> AIError:
    if cls is E.HTTPStatusError:
        return cls(418)
    return cls()


# (class, status, code, retryable, openai type): the documented table, checked exactly.
EXPECTED = {
    "InvalidRequest": (400, "invalid_request", False, "invalid_request_error"),
    "ValidationFailed": (422, "validation_failed", False, "invalid_request_error"),
    "ContentFiltered": (400, "content_filtered", False, "invalid_request_error"),
    "PolicyRefusal": (400, "policy_refusal", False, "invalid_request_error"),
    "PromptInjectionDetected": (400, "prompt_injection_detected", False, "invalid_request_error"),
    "UnsupportedApiVersion": (400, "unsupported_api_version", False, "invalid_request_error"),
    "AuthenticationFailed": (401, "authentication", False, "authentication_error"),
    "PermissionDenied": (403, "permission", False, "permission_error"),
    "NotFound": (404, "not_found", False, "not_found_error"),
    "MethodNotAllowed": (405, "method_not_allowed", False, "invalid_request_error"),
    "Conflict": (409, "conflict", True, "conflict_error"),
    "ModelRetired": (410, "model_retired", False, "invalid_request_error"),
    "RequestTooLarge": (413, "request_too_large", False, "invalid_request_error"),
    "IdempotencyKeyReused": (422, "idempotency_key_reused", False, "invalid_request_error"),
    "RateLimited": (429, "rate_limited", True, "rate_limit_error"),
    "QuotaExceeded": (429, "quota_exceeded", False, "insufficient_quota"),
    "HTTPStatusError": (418, "http_error", False, "invalid_request_error"),
    "InternalError": (500, "internal", True, "server_error"),
    "OutputSchemaInvalid": (502, "output_schema_invalid", True, "server_error"),
    "UpstreamError": (502, "upstream_error", True, "server_error"),
    "UpstreamUnavailable": (503, "upstream_unavailable", True, "server_error"),
    "UpstreamTimeout": (504, "upstream_timeout", True, "timeout_error"),
    "UpstreamRateLimited": (429, "upstream_rate_limited", True, "rate_limit_error"),
    "Overloaded": (503, "overloaded", True, "overloaded_error"),
    "StoreUnavailable": (503, "store_unavailable", True, "server_error"),
    "NotConfigured": (503, "not_configured", False, "server_error"),
    "Timeout": (504, "timeout", True, "timeout_error"),
}


def test_every_class_is_documented_in_the_table_and_the_docstring() -> None:
    names = {c.__name__ for c in all_error_classes()}
    assert names == set(EXPECTED)
    for name in names:
        assert name in (E.__doc__ or "")


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_renders_exactly(cls: type[AIError]) -> None:
    err = instantiate(cls)
    status, code, retryable, openai_type = EXPECTED[cls.__name__]
    body = problem_body(err, request_id="req_1")
    assert body == {
        "type": f"urn:aimiddleware:error:{code}",
        "title": cls.title,
        "status": status,
        "detail": err.detail,
        "instance": "urn:request:req_1",
        "request_id": "req_1",
        "retryable": retryable,
        "error": {"type": openai_type, "code": code, "message": err.detail, "param": None},
    }
    got_status, headers, raw = render_problem(err, request_id="req_1")
    assert got_status == status
    assert json.loads(raw) == body
    hdrs = dict(headers)
    assert hdrs[b"content-type"] == b"application/problem+json"
    assert hdrs[b"x-should-retry"] == (b"true" if retryable else b"false")
    assert int(hdrs[b"content-length"]) == len(raw)


def test_retry_after_is_integer_seconds_plus_ms_and_capped() -> None:
    h = dict(error_headers(E.RateLimited(retry_after=2.2)))
    assert h["retry-after"] == "3" and h["retry-after-ms"] == "2200"
    h = dict(error_headers(E.RateLimited(retry_after=0.01)))
    assert h["retry-after"] == "1" and h["retry-after-ms"] == "10"
    h = dict(error_headers(E.RateLimited(retry_after=3600)))
    assert h["retry-after"] == "60" and h["retry-after-ms"] == "60000"


def test_non_retryable_never_carries_retry_after() -> None:
    h = dict(error_headers(E.QuotaExceeded(retry_after=30)))
    assert h == {"x-should-retry": "false"}


def test_extra_members_and_own_headers() -> None:
    err = E.RateLimited(
        "60 req/min exceeded",
        extra={"dimension": "requests", "window": "1 minute"},
        headers=[("x-ratelimit-remaining-requests", "0"), ("x-should-retry", "bogus")],
    )
    body = problem_body(err, request_id=None)
    assert body["dimension"] == "requests" and "request_id" not in body
    h = error_headers(err)
    assert ("x-ratelimit-remaining-requests", "0") in h
    assert [v for k, v in h if k == "x-should-retry"] == ["true"]  # no duplicate


def test_extensions_cannot_override_core_members() -> None:
    body = problem_body(E.NotFound(extra={"status": 200, "type": "x"}), request_id="r")
    assert body["status"] == 404 and body["type"].endswith("not_found")


def test_type_base_is_configurable() -> None:
    body = problem_body(E.NotFound(), request_id=None, type_base="https://docs.example/errors/")
    assert body["type"] == "https://docs.example/errors/not_found"


def test_overloaded_can_be_529_only() -> None:
    assert E.Overloaded(status=529).status == 529
    with pytest.raises(ValueError):
        E.Overloaded(status=500)


mapper = ExceptionMapper()


def _group(excs: list[Exception]) -> Exception:
    return ExceptionGroup("g", excs)


@pytest.mark.parametrize(
    ("exc", "cls", "status"),
    [
        (HTTPException(404, "no such thing"), E.NotFound, 404),
        (HTTPException(405), E.MethodNotAllowed, 405),
        (HTTPException(418, "teapot"), E.HTTPStatusError, 418),
        (FastAPIHTTPException(401, "who?"), E.AuthenticationFailed, 401),
        (HTTPException(503, "db down: password=x"), E.Overloaded, 503),
        (HTTPException(507), E.HTTPStatusError, 507),
        (httpx.ReadTimeout("slow"), E.UpstreamTimeout, 504),
        (httpx.ConnectError("refused"), E.UpstreamUnavailable, 503),
        (TimeoutError(), E.Timeout, 504),
        (TimeoutError(), E.Timeout, 504),
        (KeyError("x"), E.InternalError, 500),
        (_group([TimeoutError()]), E.Timeout, 504),
    ],
)
def test_foreign_exceptions_map_to_the_taxonomy(exc: Exception, cls: type, status: int) -> None:
    err = mapper.map(exc)
    assert type(err) is cls and err.status == status


def test_5xx_http_exception_detail_is_not_shown() -> None:
    err = mapper.map(HTTPException(503, "db down: password=x"))
    assert "password" not in err.detail
    err = mapper.map(HTTPException(507, "disk /secret full"))
    assert "secret" not in err.detail


def test_http_exception_headers_are_kept() -> None:
    err = mapper.map(HTTPException(405, headers={"Allow": "GET"}))
    assert ("Allow", "GET") in err.headers


def test_validation_error_names_the_field_and_hides_the_input() -> None:
    exc = RequestValidationError(
        [
            {
                "type": "int_parsing",
                "loc": ("body", "messages", 0, "max_tokens"),
                "msg": "Input should be a valid integer",
                "input": "SECRET PROMPT TEXT",
            },
            {"type": "missing", "loc": ("body", "model"), "msg": "Field required", "input": {}},
        ]
    )
    err = mapper.map(exc)
    assert isinstance(err, E.ValidationFailed) and err.status == 422
    assert err.param == "messages.0.max_tokens"
    body = json.dumps(problem_body(err, request_id="r"))
    assert "SECRET PROMPT" not in body
    assert "(and 1 more)" in err.detail
    assert err.extra["invalid_params"][1] == {"param": "model", "msg": "Field required"}


def _openai_error(cls: type[openai.APIStatusError], status: int, body: Any) -> Exception:
    req = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")
    return cls(
        "upstream said: user prompt was 'hello secret'",
        response=httpx.Response(status, request=req),
        body=body,
    )


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (_openai_error(openai.RateLimitError, 429, None), E.UpstreamRateLimited),
        (_openai_error(openai.InternalServerError, 500, None), E.UpstreamUnavailable),
        (_openai_error(openai.InternalServerError, 503, None), E.UpstreamUnavailable),
        (
            _openai_error(
                openai.BadRequestError, 400, {"error": {"code": "context_length_exceeded"}}
            ),
            E.InvalidRequest,
        ),
        (_openai_error(openai.AuthenticationError, 401, None), E.UpstreamError),
        (openai.APITimeoutError(httpx.Request("GET", "https://x")), E.UpstreamTimeout),
        (
            openai.APIConnectionError(request=httpx.Request("GET", "https://x")),
            E.UpstreamUnavailable,
        ),
    ],
)
def test_openai_sdk_errors_map_without_leaking_their_message(exc: Exception, cls: type) -> None:
    err = mapper.map(exc)
    assert type(err) is cls
    assert "secret" not in json.dumps(problem_body(err, request_id=None))


def test_upstream_code_is_kept() -> None:
    exc = _openai_error(openai.BadRequestError, 400, {"error": {"code": "context_length_exceeded"}})
    assert mapper.map(exc).extra["upstream_code"] == "context_length_exceeded"


def test_anthropic_errors_map_by_name() -> None:
    import anthropic

    req = httpx.Request("POST", "https://api.anthropic.com/v1/messages")
    exc = anthropic.InternalServerError(
        "overloaded", response=httpx.Response(529, request=req), body=None
    )
    assert type(mapper.map(exc)) is E.UpstreamUnavailable
    assert type(mapper.map(anthropic.APITimeoutError(req))) is E.UpstreamTimeout


def test_user_mappings_win_and_are_matched_along_the_mro() -> None:
    class Base(Exception):
        pass

    class Child(Base):
        pass

    m = ExceptionMapper({Base: lambda e: E.PolicyRefusal("nope")})
    assert isinstance(m.map(Child()), E.PolicyRefusal)
    m.register(TimeoutError, lambda e: E.UpstreamTimeout())
    assert isinstance(m.map(TimeoutError()), E.UpstreamTimeout)
    m.register(KeyError, lambda e: None)  # None = "not mine", fall through
    assert isinstance(m.map(KeyError()), E.InternalError)


def test_secret_and_prompt_never_reach_the_body() -> None:
    exc = RuntimeError("api_key=sk-live-123 prompt='tell me the launch codes'")
    err = mapper.map(exc)
    _, headers, raw = render_problem(err, request_id="r")
    text = raw.decode() + repr(headers)
    assert "sk-live" not in text and "launch codes" not in text and "Traceback" not in text


def test_an_error_header_that_cannot_be_a_header_is_dropped_not_a_crash() -> None:
    err = E.InvalidRequest(
        "x", headers=[("x-note", "café"), ("x-snow", "a\u2603"), ("x-split", "a\r\nb")]
    )
    status, headers, _ = render_problem(err, request_id=None)
    assert status == 400
    assert (b"x-note", "café".encode("latin-1")) in headers  # Latin-1 is a valid header
    assert not {b"x-snow", b"x-split"} & {name for name, _ in headers}


@pytest.mark.parametrize(("status", "kind"), [(404, "invalid_request_error"),
                                              (502, "server_error"), (500, "server_error")])
def test_a_foreign_http_error_is_typed_by_its_status(status: int, kind: str) -> None:
    # OpenAI's error.type tells the caller whose fault it is: a 5xx is the server's, never
    # an invalid request (the reference app's 502 for an upstream refusing our key was one).
    err = E.HTTPStatusError(status)
    assert err.openai_type == kind and err.retryable is False
    assert E.HTTPStatusError.openai_type == "invalid_request_error"  # (the class unchanged)


async def test_a_clients_key_is_not_echoed_whole_in_a_validation_error() -> None:
    """A validation error named the place it failed as the client spelled it: a dict's
    key, a field a model forbids, a header name. FastAPI's errors (the error layer's
    mapping), the feedback route and the migration check repeated such a key whole, in
    the param, the detail and each invalid_params entry: 20 keys of 10 KB came back as a
    232 KB body, one as 10-20 KB. Each now shows a key's first 64 characters and "..."."""
    from fastapi import FastAPI

    from aimiddleware import MemoryLedger, StackConfig, UsageConfig, UsageRoutes, install
    from tests.live_server import serve
    from tests.versioning_app import NEW, FakeClock, at, build_app

    app = FastAPI()

    @app.post("/v1/scores")
    async def scores(body: dict[str, int]) -> dict[str, int]:
        return body

    app.router.routes.extend(UsageRoutes().routes)
    install(app, StackConfig(usage=UsageConfig(ledger=MemoryLedger())))
    versioned = build_app(FakeClock(at("2026-03-01")))
    long = "k" * 10_000
    sides = {"baseline": {"model": NEW}, "candidate": {"model": NEW}}
    check = "/_versioning/migration-check"
    async with (
        serve(app) as url, serve(versioned) as versioned_url,
        httpx.AsyncClient(headers={"authorization": "Bearer sk-team"}) as client,
    ):
        for where, body, param in [
            (f"{url}/v1/scores", {f"{long}{i}": "x" for i in range(20)}, long),
            (f"{url}/feedback", {"request_id": "req_1", "rating": 1, long: 1}, long),
            (f"{versioned_url}{check}", {"path": "/chat", long: 1, **sides}, long),
            (f"{versioned_url}{check}", {"path": "/chat", "headers": {long + " x": "1"}, **sides},
             "headers"),
        ]:
            r = await client.post(where, json=body)
            assert r.status_code == 422, (where, r.status_code)
            problem = r.json()
            assert problem["error"]["code"] == "validation_failed"
            assert len(r.content) < 4000, (where, len(r.content))
            assert problem["error"]["param"] == (param if param == "headers" else
                                                 param[:64] + "...")
            assert long[:65] not in r.text
        r = await client.post(f"{url}/v1/scores", json={"a": "x"})  # a short key: as before
        assert r.json()["error"]["param"] == "a"
