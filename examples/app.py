"""The reference app: an OpenAI-compatible chat API behind the whole aimiddleware stack.

``./dev app`` serves it on http://127.0.0.1:8000 with the embedded default (``memory://``).
Environment:

- ``AIMW_STORAGE``: ``redis://host:6379/0`` (or ``valkey://``, ``redis+cluster://``) to share
  limits, idempotency records, usage and jobs between workers and hosts.
- ``AIMW_IDEMPOTENCY_SECRET``: the fingerprint key; required with a shared storage.
- ``AIMW_UPSTREAM_URL`` (+ ``AIMW_UPSTREAM_API_KEY``, ``AIMW_UPSTREAM_MAX_CONNECTIONS``): proxy
  to a real OpenAI-compatible server (vLLM, Ollama, a provider) instead of the local
  deterministic model.
- ``AIMW_CONFIG``: another models/prices/tiers file than ``examples/config.toml``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

import aimiddleware
from aimiddleware import (
    ApiVersion,
    ApiVersions,
    AuthenticationFailed,
    CancellationConfig,
    EventStreamResponse,
    IdempotencyConfig,
    OpenAIChatDialect,
    RateLimiter,
    StackConfig,
    Storage,
    TokenCounter,
    Usage,
    UsageConfig,
    UsageRoutes,
    VersioningConfig,
    current,
)
from aimiddleware.context import default_principal
from aimiddleware.jobs import JobContext, JobsRouter
from aimiddleware.openapi import add_paths
from aimiddleware.testing import FakeModel
from aimiddleware.usage import ledger_for
from examples.settings import load_settings
from examples.upstream import Upstream

HERE = Path(__file__).resolve().parent
JOB_MODEL = "fake-chat-2026-06-01"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat request; unknown fields are passed through to the model."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    # Strict, as OpenAI is: "5", true or "yes" are not numbers or booleans here.
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=32768)
    stream: StrictBool = False
    seed: StrictInt | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)


class SummariseInput(BaseModel):
    """A summarising job's input: ``{"documents": [...]}`` or ``{"text": "..."}``."""

    model_config = ConfigDict(extra="forbid")
    documents: list[str] | None = Field(default=None, min_length=1, max_length=100)
    text: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> SummariseInput:
        if (self.documents is None) == (self.text is None):
            raise ValueError("give either 'documents' (a list of texts) or 'text'")
        return self


def create_app(
    config_path: Path | str | None = None,
    *,
    storage: str | None = None,
    idempotency_secret: str | None = None,
    upstream: Upstream | None = None,
    model: FakeModel | None = None,
) -> FastAPI:
    """Build the app; arguments default to the environment (see the module docstring)."""
    settings = load_settings(
        Path(config_path or os.environ.get("AIMW_CONFIG", HERE / "config.toml"))
    )
    store = Storage(storage or os.environ.get("AIMW_STORAGE", "memory://"))
    secret = idempotency_secret or os.environ.get("AIMW_IDEMPOTENCY_SECRET")
    if not store.is_memory and not secret:
        raise RuntimeError(
            "AIMW_IDEMPOTENCY_SECRET must be set with a shared storage: every worker must "
            "fingerprint requests with the same key"
        )
    # The local model speaks o200k_base: its names count exactly, like gpt-4o's.
    counter = (
        model.counter if model is not None else TokenCounter(models={"fake-chat": "o200k_base"})
    )
    model = model or FakeModel("fake-chat", token_counter=counter)
    upstream = upstream or Upstream.from_env()

    async def summarise_job(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
        """A job: one chat completion per document, reporting progress and usage."""
        documents = input.get("documents") or [input["text"]]  # (SummariseInput, checked)
        summaries = []
        for i, doc in enumerate(documents):
            await ctx.step()
            out = await model.complete(
                {
                    "model": "fake-chat-2026-06-01",
                    "messages": [{"role": "user", "content": str(doc)}],
                }
            )
            text = out["choices"][0]["message"]["content"]
            summaries.append(text)
            await ctx.partial(text)
            usage = Usage.from_openai_chat(out["usage"])
            await ctx.record_usage(usage, cost=settings.prices.estimate(JOB_MODEL, usage),
                                   model=JOB_MODEL)
            await ctx.progress((i + 1) / len(documents))
        return {"summaries": summaries}

    limiter = RateLimiter(
        settings.tiers,
        default_tier="free",
        tier=settings.tier_of,
        prices=settings.prices,
        counter=counter,
        storage=store,
    )
    # The jobs' model calls are charged to the submitter's token and cost limits, and each
    # finished job is a row of the caller's usage history (the usage layer's ledger).
    ledger = ledger_for(store)
    jobs = JobsRouter(summarise_job, storage=store, max_steps=100, max_cost="5.00", prefix="/v1",
                      input_model=SummariseInput, limiter=limiter, ledger=ledger)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await model.warm()
        # Everything alive now (modules, the tokenizer, the app) lives as long as the process:
        # out of every garbage collection from here on (~71,000 objects, ~30 ms a full one).
        gc.freeze()
        try:
            async with jobs.lifespan_context(app):
                yield
        finally:
            gc.unfreeze()  # (collectable again: tests start and stop many apps in one process)
        # (install()'s stack flushed the ledger before this shutdown began; the jobs ended
        # since wrote rows of their own)
        await ledger.aclose()
        await store.aclose()
        if upstream is not None:
            await upstream.aclose()

    app = FastAPI(title="aimiddleware reference app", version="1.0", lifespan=lifespan)

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {
                "description": "A chat.completion, or with `stream: true` an event stream of "
                "chat.completion.chunk events ending in `data: [DONE]`.",
                "content": {"application/json": {}, "text/event-stream": {}},
            }
        },
    )
    async def chat_completions(body: ChatRequest) -> Any:
        """OpenAI-compatible chat completion, streaming (`stream: true`) or not."""
        ctx = current()
        request = body.model_dump(exclude_none=True)
        request["model"] = ctx.model_version or body.model  # the pinned snapshot
        if upstream is not None:
            return await upstream.chat(request)
        if body.stream:
            return EventStreamResponse(  # (validated first: bad input is a 4xx, not a 200)
                await model.open_stream(request), dialect=OpenAIChatDialect.for_request(request)
            )
        return await model.complete(request)

    usage_routes = UsageRoutes(
        usage_path="/v1/usage",
        count_tokens_path="/v1/count_tokens",
        feedback_path="/v1/feedback",
    )
    app.router.routes.extend(usage_routes.routes)
    # The jobs routes join the app's own (a Mount("/v1") would also catch every other /v1/*
    # path that matches no route, turning 405s into 404s).
    app.router.routes.extend(jobs.routes)
    # FastAPI documents only its own routes: these join /openapi.json too (before install(),
    # which adds the stack's errors, headers and Idempotency-Key to them as well).
    add_paths(app, usage_routes.openapi_paths(), jobs.openapi_paths())

    versions = ApiVersions(
        [
            ApiVersion.deprecated(
                "2025-01-01",
                deprecated="2026-01-01",
                sunset="2027-01-01",
                replacement="2026-06-01",
            ),
            "2026-06-01",
        ],
        header="api-version",
        default="2026-06-01",
    )

    async def authenticate(scope: Any) -> str:
        """A known API key's principal, else the caller's address (the free tier); an API
        key this app does not know is a 401, not a tenant of its own: made-up keys must not
        each get a fresh quota."""
        principal = default_principal(scope)
        if principal.startswith("key_") and principal not in settings.tier_of:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal

    aimiddleware.install(
        app,
        StackConfig(
            principal=authenticate,
            storage=store,
            versioning=VersioningConfig(
                registry=settings.registry,
                versions=versions,
                models_path="/v1/models",
                migration_path="/v1/migration-check",
            ),
            idempotency=IdempotencyConfig(secret=secret),
            ratelimit=limiter,
            # Routes that call no model take no quota (a 2xx that reports no usage keeps its
            # token reservation, see the README's limitations).
            # Reading or cancelling a job or batch calls no model either: a caller whose job
            # spent its budget can still read how it ended.
            ratelimit_exempt=("/v1/models*", "/v1/usage*", "/v1/feedback", "/v1/count_tokens",
                              "/v1/jobs/*", "/v1/batches/*", "/docs*", "/redoc*",
                              "/openapi.json"),
            usage=UsageConfig(prices=settings.prices, counter=counter, ledger=ledger),
            cancellation=CancellationConfig(
                timeouts={"/v1/chat/completions": 120, "/v1/jobs*": None, "/v1/batches*": None},
                default_timeout=30,
            ),
        ),
    )
    return app


app = create_app()
