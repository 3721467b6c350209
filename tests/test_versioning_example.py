"""The README's worked example, run as written (with the clock moved to show retirement)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from examples import versioning as example


async def test_readme_example() -> None:
    now = [datetime(2026, 3, 1, tzinfo=UTC)]
    example.registry.clock = lambda: now[0]
    example.versions.clock = lambda: now[0]
    transport = httpx.ASGITransport(app=example.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        v1 = await c.post("/summarize", json={"model": "summarizer"},
                          headers={"api-version": "2025-01-01"})
        v2 = await c.post("/summarize", json={"model": "summarizer"})
        old = await c.post("/summarize", json={"model": "summarizer-2025-01-15"})
        models = await c.get("/v1/models")
        now[0] = datetime(2026, 7, 1, tzinfo=UTC)
        gone = await c.post("/summarize", json={"model": "summarizer-2025-01-15"})
    assert v1.json() == {"summary": "summary by summarizer-2026-06-01"}
    assert v1.headers["deprecation"] == "@1769904000"  # the 2025-01-01 API version
    assert v2.json()["output"][0]["text"] == "summary by summarizer-2026-06-01"
    assert v2.json()["model"] == "summarizer" and "deprecation" not in v2.headers
    assert old.headers["deprecation"] == "@1767225600"
    assert old.headers["sunset"] == "Wed, 01 Jul 2026 00:00:00 GMT"
    assert old.headers["link"] == (
        '<https://docs.example.com/deprecations>; rel="deprecation"; type="text/html"'
    )
    shutdown = {m["id"]: m["shutdown_date"] for m in models.json()["data"]}
    assert shutdown["summarizer-2025-01-15"] == "2026-07-01"
    assert gone.status_code == 410
    assert gone.json()["replacement"] == "summarizer-2026-06-01"
