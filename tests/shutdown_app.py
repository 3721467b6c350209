"""An app for the shutdown tests, served by a uvicorn subprocess (``--factory``): the whole
stack on ``AIMW_TEST_REDIS``, whose lifespan closes the store as an app's would."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aimiddleware import IdempotencyConfig, Policy, StackConfig, Storage, UsageConfig, install


def create_app() -> FastAPI:
    storage = Storage(os.environ["AIMW_TEST_REDIS"])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await storage.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(60)  # (cut by the server's graceful-shutdown timeout)
        return {"text": "late"}

    install(app, StackConfig(
        storage=storage,
        idempotency=IdempotencyConfig(secret="shared-test-secret-0123456789"),
        ratelimit=Policy(requests="100/minute", concurrency=5),
        usage=UsageConfig(),
    ))
    return app
