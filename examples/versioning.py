"""Worked example: one endpoint, two API versions with two response schemas, and a model
being retired. Run: ``uvicorn examples.versioning:app``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

import aimiddleware
from aimiddleware import ApiVersion, ApiVersions, ModelRegistry, VersioningConfig, current

# Models: two dated snapshots; the alias "summarizer" points at the newest.
registry = ModelRegistry()
registry.add_snapshot("summarizer-2026-06-01")
registry.add_snapshot(
    "summarizer-2025-01-15",
    deprecated="2026-01-01",  # announced: responses now carry Deprecation/Sunset/Link
    sunset="2026-07-01",  # from then on: 410 model_retired naming the replacement
    replacement="summarizer-2026-06-01",
    deprecation_link="https://docs.example.com/deprecations",
)
registry.alias("summarizer", "summarizer-2026-06-01")

# API versions: chosen by the Api-Version header, else the caller's pin, else the default.
versions = ApiVersions(
    [
        ApiVersion.deprecated("2025-01-01", deprecated="2026-02-01", sunset="2026-12-31",
                              replacement="2026-06-01"),
        "2026-06-01",
    ],
    header="api-version",
    default="2026-06-01",
    pins={"tenant-legacy": "2025-01-01"},  # principals (see StackConfig.principal)
)

app = FastAPI()


@app.post("/summarize")
async def summarize(body: dict[str, Any]) -> dict[str, Any]:
    ctx = current()  # ctx.api_version, ctx.model (as asked), ctx.model_version (as served)
    summary = f"summary by {ctx.model_version}"
    if ctx.api_version == "2025-01-01":  # v1 schema: a flat string
        return {"summary": summary}
    return {  # v2 schema: structured output, and the model echoed
        "output": [{"type": "text", "text": summary}],
        "model": ctx.model,
        "model_version": ctx.model_version,
    }


aimiddleware.install(
    app,
    versioning=VersioningConfig(
        versions=versions,
        registry=registry,
        models_path="/v1/models",  # OpenAI-shaped list with shutdown_date
        migration_path="/v1/migration-check",  # off unless set
    ),
)
