"""A small FastAPI app with the versioning layer, shared by the versioning tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI

from aimiddleware import (
    ApiVersion,
    ApiVersions,
    ModelRegistry,
    StackConfig,
    Usage,
    VersioningConfig,
    current,
    install,
    report_usage,
)
from aimiddleware.versioning.monitor import DeprecationHook, DeprecationMonitor

OLD = "my-model-2025-01-15"
NEW = "my-model-2026-06-01"


class FakeClock:
    """An injectable clock: ``clock.now`` is what every lifecycle check sees."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def make_registry(clock: FakeClock) -> ModelRegistry:
    registry = ModelRegistry(clock=clock)
    registry.add_snapshot(NEW)
    registry.add_snapshot(
        OLD,
        deprecated="2026-01-01",
        sunset="2026-07-01",
        replacement=NEW,
        deprecation_link="https://docs.example/deprecations#my-model-2025-01-15",
        sunset_link="https://docs.example/sunset-policy",
        successor_link="https://docs.example/models/my-model-2026-06-01",
    )
    registry.alias("my-model", NEW)
    registry.alias("latest", NEW)
    return registry


def make_versions(
    clock: FakeClock,
    *,
    pins: Mapping[str, str] | Callable[[str], Any] | None = None,
    path_prefix: bool = False,
) -> ApiVersions:
    if path_prefix:
        return ApiVersions(
            [
                ApiVersion.deprecated("v1", deprecated="2026-02-01", sunset="2026-09-01",
                                      replacement="v2", successor_link="https://docs.example/v2"),
                "v2",
            ],
            header=None,
            path_prefix=True,
            pins=pins,
            clock=clock,
        )
    return ApiVersions(
        [
            ApiVersion.deprecated("2025-01-01", deprecated="2026-02-01", sunset="2026-09-01",
                                  replacement="2026-06-01"),
            "2026-06-01",
        ],
        header="x-api-version",
        default="2026-06-01",
        pins=pins,
        clock=clock,
    )


def build_app(
    clock: FakeClock,
    *,
    pins: Mapping[str, str] | Callable[[str], Any] | None = None,
    path_prefix: bool = False,
    hook: DeprecationHook | None = None,
    monitor: DeprecationMonitor | None = None,
    storage: Any = "memory://",
    migration: bool = True,
) -> FastAPI:
    """``POST /chat`` answers in one of two schemas, depending on the API version."""
    app = FastAPI()

    @app.post("/chat")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        ctx = current()
        newer = ctx.model_version == NEW
        text = f"Hello from {ctx.model_version}" + ("!" if newer else ".")
        usage = Usage(input_tokens=12, output_tokens=4 if newer else 6)
        report_usage(usage, finish_reason="stop" if newer else "length")
        if ctx.api_version in ("2025-01-01", "v1"):  # the old schema: flat text
            return {"model": ctx.model, "text": text, "tokens": usage.total_tokens}
        return {  # the new schema: OpenAI-like choices and usage
            "model": ctx.model,
            "model_version": ctx.model_version,
            "choices": [{"message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if newer else "length"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": usage.output_tokens,
                      "total_tokens": usage.total_tokens},
        }

    @app.get("/whoami")
    async def whoami() -> dict[str, Any]:
        ctx = current()
        return {"api_version": ctx.api_version, "model": ctx.model, "path": ctx.path}

    config = VersioningConfig(
        versions=make_versions(clock, pins=pins, path_prefix=path_prefix),
        registry=make_registry(clock),
        on_deprecated=hook,
        monitor=monitor,
        models_path="/v1/models" if not path_prefix else "/models",
        migration_path="/_versioning/migration-check" if migration else None,
    )
    install(app, StackConfig(storage=storage, versioning=config))
    return app


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server on 127.0.0.1 (free port); yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
