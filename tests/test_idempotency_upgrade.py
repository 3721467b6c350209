"""Fingerprints now carry the API version; a record written before (an upgrade, an older
worker in a rolling deploy) still matches the same request, instead of a 422."""

from __future__ import annotations

import time

from aimiddleware.context import RequestContext
from aimiddleware.idempotency import IdempotencyConfig
from aimiddleware.idempotency.engine import IdempotencyEngine
from aimiddleware.idempotency.models import Claimed, Completed


async def test_a_record_fingerprinted_without_the_api_version_still_matches() -> None:
    engine = IdempotencyEngine(IdempotencyConfig(secret="s" * 16))
    ctx = RequestContext(request_id="req_1", principal="p", method="POST",
                         path="/v1/chat/completions", api_version="2026-06-01")
    ctx.body = b'{"model": "m"}'
    headers = [(b"idempotency-key", b"k1")]
    legacy = engine.fingerprint("POST", ctx.path, b"", ctx.body)  # (no version: before)
    key = engine.record_key("p", "POST", ctx.path, "k1")
    assert isinstance(await engine.store.claim(key, legacy, "old-worker", 60), Claimed)
    answer = Completed(status=200, headers=(("content-type", "application/json"),),
                       body=b'{"ok": true}', fingerprint=legacy, stored_at=time.time())
    assert await engine.store.complete(key, "old-worker", answer, 3600)

    begin = await engine.begin(ctx, headers, b"")
    assert begin.error is None and begin.replay is not None
    assert begin.replay.body == b'{"ok": true}'
    # Another body under the same key is still refused.
    ctx.body = b'{"model": "other"}'
    refused = await engine.begin(ctx, headers, b"")
    assert refused.error is not None and refused.error.code == "idempotency_key_reused"
