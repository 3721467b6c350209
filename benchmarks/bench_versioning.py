"""Cost of the versioning layer on a JSON route: version + model resolution and headers.

Contenders (all in one process, interleaved): the context layer alone (anchor), plus the
versioning layer resolving an alias to an active snapshot, plus the layer on a deprecated
snapshot and API version (Deprecation/Sunset/Link headers and a per-principal count).
"""

from __future__ import annotations

import json
from typing import Any

from aimiddleware import (
    ApiVersion,
    ApiVersions,
    ModelRegistry,
    RequestContextMiddleware,
    VersioningMiddleware,
)
from benchmarks.harness import as_json, compare, make_request, table


async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    body = b'{"output":"ok"}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def versioned() -> Any:
    registry = ModelRegistry()
    registry.add_snapshot("m-2026-06-01")
    registry.add_snapshot(
        "m-2025-01-15",
        deprecated="2026-01-01",
        sunset="2099-01-01",
        replacement="m-2026-06-01",
        deprecation_link="https://docs.example/deprecations",
    )
    registry.alias("m", "m-2026-06-01")
    versions = ApiVersions(
        [
            ApiVersion.deprecated("2025-01-01", deprecated="2026-01-01", sunset="2099-01-01"),
            "2026-06-01",
        ],
        header="api-version",
    )
    return RequestContextMiddleware(
        VersioningMiddleware(endpoint, versions=versions, registry=registry)
    )


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    alias = json.dumps({"model": "m", "input": "hello"}).encode()
    old = json.dumps({"model": "m-2025-01-15", "input": "hello"}).encode()
    ct = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench")]
    app = versioned()
    contenders = {
        "context only": (RequestContextMiddleware(endpoint), make_request("POST", "/x", alias, ct)),
        "+ versioning (alias, active)": (app, make_request("POST", "/x", alias, ct)),
        "+ versioning (deprecated model + version)": (
            app,
            make_request("POST", "/x", old, [*ct, (b"api-version", b"2025-01-01")]),
        ),
    }
    results = await compare(
        contenders,
        requests=300 if quick else 2000,
        rounds=3 if quick else 7,
        warmup=50 if quick else 200,
    )
    return (
        table(results, "context only", "Versioning layer overhead (JSON route, memory monitor)"),
        as_json(results, "context only"),
    )
