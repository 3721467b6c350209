"""The per-request shortcuts of the context: same ids, principals and parsed bodies."""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import pytest

from aimiddleware import context
from aimiddleware.context import (
    RequestContext,
    default_principal,
    key_principal,
    new_request_id,
    valid_request_id,
)
from aimiddleware.context_middleware import RequestContextMiddleware
from aimiddleware.errors import InvalidRequest


def test_request_ids_are_random_unique_and_well_formed() -> None:
    ids = [new_request_id() for _ in range(3 * context._ID_BATCH + 7)]  # several batches
    assert len(set(ids)) == len(ids)
    for rid in ids:
        assert rid.startswith("req_") and len(rid) == 28 and valid_request_id(rid)
        int(rid[4:], 16)
    # 96 random bits each: the hex digits are spread evenly (not a counter or a clock)
    digits = "".join(rid[4:] for rid in ids)
    assert all(digits.count(d) > len(digits) / 16 / 2 for d in "0123456789abcdef")


def test_a_forked_worker_never_reuses_the_parents_ids() -> None:
    new_request_id()  # the parent holds a partly used batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.write(write, " ".join(new_request_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode().split()
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(context._ID_BATCH)]
    assert len(child) == 5 and not set(child) & set(parent)


def test_principal_cache_gives_the_hash_and_stays_bounded() -> None:
    for i in range(context._PRINCIPALS_MAX + 50):
        key = f"sk-{i}".encode()
        for headers in ([(b"authorization", b"Bearer " + key)], [(b"x-api-key", key)]):
            want = "key_" + hashlib.sha256(key).hexdigest()[:32]
            assert default_principal({"type": "http", "headers": headers}) == want
            assert default_principal({"type": "http", "headers": headers}) == want  # cached
    assert 0 < len(context._principals) <= context._PRINCIPALS_MAX
    scope = {"headers": [(b"authorization", bytearray(b"Bearer sk-x"))]}
    assert default_principal(scope) == "key_" + hashlib.sha256(b"sk-x").hexdigest()[:32]
    assert key_principal(b"sk-x") == key_principal(bytearray(b"sk-x")) == default_principal(scope)


def _ctx(body: bytes) -> RequestContext:
    return RequestContext(request_id="r", principal="p", method="POST", path="/", body=body)


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


EDGE_BODIES = [
    b'{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"hello"}]}',
    b'{"a":1,"a":2}',  # duplicate keys: the last wins
    b'"\\ud800"',  # a lone surrogate escape
    b'{"\\udc00x":1}',
    b'"\\ud83d\\ude00"',
    b"\xef\xbb\xbf" + b'{"a":1}',  # UTF-8 BOM
    '{"a":"é"}'.encode("utf-16"),
    '{"a":"é"}'.encode("utf-32"),
    b"[" * 500 + b"]" * 500,  # deeper than pydantic_core's limit, fine for json
    b"[" * 100_000 + b"]" * 100_000,  # too deep for both
    b"1" + b"0" * 4299,  # the longest int json accepts
    b"1" + b"0" * 4300,
    b"123456789012345678901234567890",
    b"[NaN, Infinity, -Infinity, 1e400, -0.0, 0.1, 5e-324]",
    b'"a\x01b"',
    b'{"a":1} x',
    b"[1,]",
    b"\xff",
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8
    b" \n\t{}\r\n",
    b"null",
]


@pytest.mark.parametrize("body", EDGE_BODIES, ids=range(len(EDGE_BODIES)))
def test_json_is_what_json_loads_gives(body: bytes) -> None:
    ctx = _ctx(body)
    got, want = ctx.json(), _loads(body)
    assert repr(got) == repr(want)  # repr: NaN, -0.0 and int vs float compared too
    assert ctx.json() is got  # parsed once


def test_json_of_an_empty_body_is_none() -> None:
    assert _ctx(b"").json() is None


_KEY_HEADERS = [
    (b"authorization", b"Bearer sk-a"),
    (b"authorization", b"bearer  sk-b "),
    (b"authorization", b"Basic dXNlcg=="),
    (b"authorization", b"Bearer "),
    (b"x-api-key", b"sk-c"),
    (b"x-api-key", b"  "),
    (b"x-api-key", b" sk-d "),
    (b"accept", b"*/*"),
]


@pytest.mark.parametrize("seed", range(60))
async def test_the_principal_from_the_one_header_scan_is_default_principals(seed: int) -> None:
    rng = random.Random(seed)
    headers = [rng.choice(_KEY_HEADERS) for _ in range(rng.randint(0, 4))]
    scope: dict[str, Any] = {
        "type": "http", "method": "POST", "path": "/", "headers": headers,
        "client": ("10.0.0.1", 1),
    }  # fmt: skip
    mw = RequestContextMiddleware(lambda *a: None)  # type: ignore[arg-type,return-value]
    ctx, length, key = mw.new_context(scope)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    names = [name for name, _ in headers]
    if names.count(b"authorization") > 1 or names.count(b"x-api-key") > 1:
        # Which key is the caller's? (A proxy may have authenticated the other one.)
        assert not await mw.read_request(ctx, scope, receive, send, length, key)
        assert sent[0]["status"] == 400
        assert json.loads(sent[1]["body"])["error"]["param"] == "authorization"
        with pytest.raises(InvalidRequest):
            default_principal(scope)
        return
    assert await mw.read_request(ctx, scope, receive, send, length, key)
    assert not sent
    assert ctx.principal == default_principal(scope), headers
