"""RateLimitMiddleware through the installed stack: headers, refusals, budgets, leases."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import anyio
import http_sfv
import httpx
import pytest
from starlette.responses import StreamingResponse

from aimiddleware import Policy, RateLimiter, SpendAlert
from aimiddleware.context import SCOPE_KEY
from aimiddleware.storage import Storage
from tests.ratelimit_helpers import PRICES, client, counters, make_app, principal_of

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
GO_DURATION = re.compile(r"^(0s|\d+ms|(\d+h)?(\d+m)?\d+(\.\d{1,3})?s)$")


def parse_list(value: str) -> list[tuple[Any, dict[str, Any]]]:
    lst = http_sfv.List()
    lst.parse(value.encode())
    return [(item.value, dict(item.params)) for item in lst]


def go_seconds(value: str) -> float:
    if value.endswith("ms"):
        return int(value[:-2]) / 1000
    m = re.match(r"^(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s$", value)
    assert m is not None, value
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s)


def check_headers(response: httpx.Response) -> None:
    """Rate-limit headers present once each; structured fields parse (RFC 8941)."""
    names = [k.lower() for k, _ in response.headers.raw]
    for name in ("ratelimit", "ratelimit-policy", "x-ratelimit-limit-requests"):
        assert names.count(name.encode()) == 1, (name, response.headers)
    parse_list(response.headers["ratelimit"])
    parse_list(response.headers["ratelimit-policy"])
    for name, value in response.headers.items():
        if name.startswith("x-ratelimit-limit") or name.startswith("x-ratelimit-remaining"):
            item = http_sfv.Item()
            item.parse(value.encode())
            assert isinstance(item.value, int) and item.value >= 0
        elif name.startswith("x-ratelimit-reset"):
            assert GO_DURATION.match(value), value  # Go duration (OpenAI), by design not an SF


async def test_headers_on_every_response_without_duplicates() -> None:
    limiter = RateLimiter(
        Policy(requests="5/minute;100/day", tokens="10000/minute", concurrency=4)
    )
    app = make_app(limiter)
    async with client(app) as c:
        first = await c.post(CHAT, json=BODY)
        ping = await c.get("/ping")  # the app set its own x-ratelimit-limit-requests
        failed = await c.post(CHAT, json={**BODY, "fail": "status"})
    for r in (first, ping, failed):
        check_headers(r)
    assert ping.headers["x-ratelimit-limit-requests"] == "5"
    assert first.headers["x-ratelimit-remaining-requests"] == "4"
    assert ping.headers["x-ratelimit-remaining-requests"] == "3"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 10000
    policy = dict(parse_list(first.headers["ratelimit-policy"]))
    assert policy["requests-1m"] == {"q": 5, "qu": "requests", "w": 60}
    assert policy["requests-1d"] == {"q": 100, "qu": "requests", "w": 86400}
    assert policy["tokens-1m"] == {"q": 10000, "w": 60}
    assert policy["concurrency"] == {"q": 4, "qu": "concurrent-requests"}
    state = dict(parse_list(first.headers["ratelimit"]))
    assert state["requests-1m"]["r"] == 4 and state["concurrency"]["r"] == 3


async def test_429_names_dimension_and_window_with_retry_after_past_reset() -> None:
    limiter = RateLimiter(Policy(requests="2/minute"))
    app = make_app(limiter)
    async with client(app) as c:
        assert [(await c.post(CHAT, json=BODY)).status_code for _ in range(2)] == [200, 200]
        r = await c.post(CHAT, json=BODY)
        other = await c.post(CHAT, json=BODY, headers={"authorization": "Bearer k2"})
    assert other.status_code == 200  # scoped per principal
    assert r.status_code == 429
    body = r.json()
    assert body["error"]["code"] == "rate_limited" and body["retryable"] is True
    assert body["dimension"] == "requests" and body["window"] == 60
    assert body["violated-policies"] == ["requests-1m"]
    assert "per 1m" in body["detail"]
    assert r.headers["x-should-retry"] == "true"
    retry = int(r.headers["retry-after"])
    assert retry >= go_seconds(r.headers["x-ratelimit-reset-requests"])
    assert int(r.headers["retry-after-ms"]) <= retry * 1000
    assert retry >= dict(parse_list(r.headers["ratelimit"]))["requests-1m"]["t"]
    check_headers(r)


async def test_daily_and_money_budgets_are_quota_exceeded() -> None:
    limiter = RateLimiter(Policy(requests="1/day"))
    async with client(make_app(limiter)) as c:
        await c.post(CHAT, json=BODY)
        r = await c.post(CHAT, json=BODY)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert r.headers["x-should-retry"] == "false"
    assert int(r.headers["retry-after"]) > 0

    money = RateLimiter(Policy(cost="0.0001/hour"), prices=PRICES)
    async with client(make_app(money)) as c:
        big = {**BODY, "max_tokens": 100}  # ~0.00006 each
        assert (await c.post(CHAT, json=big)).status_code == 200
        r = await c.post(CHAT, json=big)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "quota_exceeded" and r.json()["dimension"] == "cost"
    assert r.json()["limit"] == "0.0001"


async def test_request_bigger_than_a_whole_window_is_refused_at_once() -> None:
    limiter = RateLimiter(Policy(tokens="1000/minute"))
    async with client(make_app(limiter)) as c:
        r = await c.post(CHAT, json={**BODY, "max_tokens": 5000})
        assert (await counters(limiter, "k1")) == {"tokens:60": 0}
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "quota_exceeded"
    assert "can never be admitted" in r.json()["detail"]
    assert int(r.json()["requested"]) > 5000 and r.json()["limit"] == "1000"


async def test_malformed_json_on_a_token_limited_route_is_a_typed_400() -> None:
    limiter = RateLimiter(Policy(tokens="1000/minute"))
    async with client(make_app(limiter)) as c:
        r = await c.post(CHAT, content=b'{"model": "gpt-4o-mini", "messages": [',
                         headers={"content-type": "application/json"})
        arr = await c.post(CHAT, json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert "not valid JSON" in r.json()["detail"]
    assert arr.status_code == 400


async def test_output_estimate_used_without_max_tokens_and_input_counted() -> None:
    limiter = RateLimiter(
        {"free": Policy(tokens="100000/minute", output_estimate=300),
         "pro": Policy(tokens="100000/minute")},
        tier={principal_of("k1"): "free"}, default_tier="pro",
        output_estimate={"gpt-4o-mini": 700, "*": 900},
    )
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 50}]}
    async with client(make_app(limiter)) as c:
        r1 = await c.post(CHAT, json=body)
        r2 = await c.post(CHAT, json=body, headers={"authorization": "Bearer k2"})
    used1 = 100000 - int(r1.headers["x-ratelimit-remaining-tokens"])
    used2 = 100000 - int(r2.headers["x-ratelimit-remaining-tokens"])
    assert used1 - 300 == used2 - 700  # same prompt, per-tier vs per-model estimate
    assert 50 <= used1 - 300 <= 70  # the prompt was tokenized (o200k_base), not guessed


async def test_an_embeddings_request_reserves_no_output_tokens() -> None:
    # An embeddings call generates nothing, but (it has no max_tokens) each reserved the
    # 1,024-token output estimate: under 1000/minute every one was refused as larger than
    # the window, and in front of a real model 20 concurrent batches of 48 tokens under
    # 8,000/minute were held back ~97 s by each other's reservations.
    limiter = RateLimiter(Policy(tokens="1000/minute"))
    body = {"model": "text-embedding-3-small", "input": ["hello world", "item 7"],
            "encoding_format": "base64"}  # as the openai SDK sends it
    async with client(make_app(limiter)) as c:  # (the limiter does not look at the path)
        r = await c.post(CHAT, json=body)
        chat = await c.post(CHAT, json={"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert 1000 - int(r.headers["x-ratelimit-remaining-tokens"]) == 2 + 3  # the inputs alone
    assert chat.status_code == 429  # a chat body without max_tokens still reserves 1024
    assert chat.json()["error"]["code"] == "quota_exceeded"


async def test_a_bare_string_on_an_embeddings_route_is_counted_and_reserved_as_embeddings(
) -> None:
    # curl's embeddings body (a bare string, no encoding_format) has a Responses body's
    # shape: it was counted with chat overhead and reserved the 1,024-token output
    # estimate, so under 1000/minute every one was refused as "can never be admitted".
    # Its route says what it is: OpenAI's /v1/embeddings, Ollama's /api/embed.
    from aimiddleware import TokenCounter

    text = "hello world"
    exact = TokenCounter().count_text(text, "text-embedding-3-small").tokens
    body = {"model": "text-embedding-3-small", "input": text}
    limiter = RateLimiter(Policy(tokens="1000/minute"))
    app = make_app(limiter)
    for path in ("/v1/embeddings", "/api/embed"):
        async with client(app, key=path) as c:  # (a fresh window each)
            r = await c.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["x-ratelimit-remaining-tokens"] == str(1000 - exact), path
    async with client(app) as c:
        # the same body elsewhere is still a Responses request: its input plus 1,024
        responses = await c.post(CHAT, json=body)
    assert responses.status_code == 429
    assert responses.json()["error"]["code"] == "quota_exceeded"


async def test_route_and_model_policies_set_their_output_estimate() -> None:
    # Policy(output_estimate=...) on a route or a model was accepted and ignored: a request
    # without max_tokens reserved the tier's estimate (here the limiter's 1,024) anyway.
    from aimiddleware import TokenCounter

    def body(model: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}]}

    async def reserved(limiter: RateLimiter, model: str) -> int:
        async with client(make_app(limiter), key=f"k-{model}") as c:  # (a fresh window)
            r = await c.post(CHAT, json=body(model))
        assert r.status_code == 200
        prompt = TokenCounter().count_request(body(model)).tokens
        return 100000 - int(r.headers["x-ratelimit-remaining-tokens"]) - prompt

    tier = Policy(tokens="100000/minute", models={"gpt-4o-mini": Policy(output_estimate=20)})
    by_model = RateLimiter(tier)
    by_route = RateLimiter(tier, routes={"/v1/chat/*": Policy(output_estimate=10)})
    assert await reserved(by_model, "gpt-4o-mini") == 20  # the model's
    assert await reserved(by_model, "gpt-4o") == 1024  # no estimate of its own
    assert await reserved(by_route, "gpt-4o-mini") == 10  # the route's, before the tier's
    assert await reserved(by_route, "gpt-4o") == 10


async def test_a_route_or_model_estimate_is_not_dodged_by_an_embeddings_shaped_body() -> None:
    # The embeddings rule reads the body alone, which the client writes: a Responses body
    # with encoding_format beside its input (a server that ignores unknown fields runs it)
    # reserved no output even where the operator set the route's or the model's estimate.
    from aimiddleware import TokenCounter

    body = {"model": "gpt-4o-mini", "input": "write a long essay", "encoding_format": "float"}
    prompt = TokenCounter().count_request(body).tokens

    async def reserved(limiter: RateLimiter, key: str) -> int:
        async with client(make_app(limiter), key=key) as c:  # (a fresh window)
            r = await c.post(CHAT, json=body)
        assert r.status_code == 200
        return 100000 - int(r.headers["x-ratelimit-remaining-tokens"]) - prompt

    by_route = RateLimiter(Policy(tokens="100000/minute"),
                           routes={"/v1/chat/*": Policy(output_estimate=300)})
    by_model = RateLimiter(Policy(tokens="100000/minute",
                                  models={"gpt-4o-mini": Policy(output_estimate=20)}))
    by_tier = RateLimiter(Policy(tokens="100000/minute", output_estimate=500))
    assert await reserved(by_route, "k-route") == 300  # (was 0)
    assert await reserved(by_model, "k-model") == 20  # (was 0)
    assert await reserved(by_tier, "k-tier") == 0  # a tier's blanket estimate: still none


async def test_tiers_overrides_per_model_and_per_route_policies() -> None:
    async def overrides(principal: str) -> Policy | str | None:
        return Policy(requests="1/minute") if principal == principal_of("vip-low") else None

    limiter = RateLimiter(
        {"default": Policy(requests="3/minute",
                           models={"gpt-4o": Policy(requests="1/minute")})},
        overrides=overrides,
        routes={"/v1/*": Policy(requests="2/minute")},
    )
    app = make_app(limiter)
    async with client(app, "k-model") as c:
        assert (await c.post(CHAT, json={**BODY, "model": "gpt-4o"})).status_code == 200
        r = await c.post(CHAT, json={**BODY, "model": "gpt-4o"})
        assert r.status_code == 429 and r.json()["violated-policies"] == [
            "model-gpt-4o-requests-1m"]
        assert "for model gpt-4o" in r.json()["detail"]
        assert (await c.post(CHAT, json=BODY)).status_code == 200  # other model: own budget
        r = await c.post(CHAT, json=BODY)  # the /v1/* route allows 2
        assert r.status_code == 429
        assert r.json()["violated-policies"] == ["route-_v1__-requests-1m"]
    async with client(app, "vip-low") as c:
        assert (await c.post(CHAT, json=BODY)).status_code == 200
        assert (await c.post(CHAT, json=BODY)).status_code == 429


async def test_long_model_ids_sharing_a_prefix_name_their_limits_apart() -> None:
    # Limit names were cut at 48 characters: two Bedrock profiles (one prefix of 61) got
    # one name, so RateLimit-Policy listed two members alike and a refusal named either.
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic."
    sonnet, haiku = arn + "claude-3-5-sonnet-20241022-v2:0", arn + "claude-3-5-haiku-20241022-v1:0"
    limiter = RateLimiter(Policy(requests="10/minute", models={
        sonnet: Policy(requests="1/minute"), haiku: Policy(requests="2/minute")}))
    async with client(make_app(limiter)) as c:
        assert (await c.post(CHAT, json={**BODY, "model": sonnet})).status_code == 200
        refused = await c.post(CHAT, json={**BODY, "model": sonnet})
        other = await c.post(CHAT, json={**BODY, "model": haiku})
    assert refused.status_code == 429 and other.status_code == 200
    (violated,) = refused.json()["violated-policies"]
    assert violated in [name for name, _ in parse_list(refused.headers["ratelimit-policy"])]
    assert violated.startswith("model-arn_aws_bedrock_") and len(violated) <= 70
    haiku_names = {lim.name for lim in limiter.policies["default"].limits_for(haiku)}
    assert violated not in haiku_names and len(haiku_names) == 2  # (requests-1m, its own)


async def test_a_route_policys_per_model_limit_counts_that_model_alone(storage: Storage) -> None:
    # The route's per-model limit was scoped to the route only, so it shared the route
    # limit's counter (one field): gpt-4o was refused once other models used 1 request of
    # the route, and RateLimit-Policy named two members alike.
    limiter = RateLimiter(
        Policy(requests="100/minute"),
        routes={"/v1/*": Policy(requests="10/minute",
                                models={"gpt-4o": Policy(requests="1/minute")})},
        storage=storage,
    )
    async with client(make_app(limiter)) as c:
        for _ in range(3):
            assert (await c.post(CHAT, json=BODY)).status_code == 200
        first = await c.post(CHAT, json={**BODY, "model": "gpt-4o"})
        assert first.status_code == 200
        names = [item for item, _ in parse_list(first.headers["ratelimit-policy"])]
        assert len(names) == len(set(names)) == 3
        second = await c.post(CHAT, json={**BODY, "model": "gpt-4o"})
        assert second.status_code == 429
        assert "for model gpt-4o" in second.json()["detail"]
        (violated,) = second.json()["violated-policies"]
        assert violated.startswith("route-") and "gpt-4o" in violated
        assert (await c.post(CHAT, json=BODY)).status_code == 200  # the route: 5 of 10


async def test_spend_alerts_fire_once_per_window(storage: Storage) -> None:
    seen: list[SpendAlert] = []

    async def on_alert(alert: SpendAlert) -> None:
        seen.append(alert)

    limiter = RateLimiter(
        Policy(tokens="1000/minute"), alert_fractions=(0.5, 0.8, 1.0), on_alert=on_alert,
        storage=storage,
    )
    async with client(make_app(limiter)) as c:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        for max_tokens in (300, 300, 300, 50, 5):
            await c.post(CHAT, json={**body, "max_tokens": max_tokens})
    assert [a.fraction for a in seen] == [0.5, 0.8]
    assert seen[0].dimension == "tokens" and seen[0].limit == Decimal(1000)
    assert seen[0].name == "tokens-1m" and seen[0].used >= 500


async def test_cancelled_request_releases_its_lease() -> None:
    limiter = RateLimiter(Policy(concurrency=1, requests="100/minute"))
    app = make_app(limiter)
    async with client(app) as c:
        async with anyio.create_task_group() as tg:
            async def slow() -> None:
                await c.post(CHAT, json={**BODY, "sleep": 30})

            tg.start_soon(slow)
            with anyio.fail_after(10):  # the slow request holds the one slot
                while not await limiter.backend.in_flight(principal_of("k1")):  # type: ignore[attr-defined]  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            busy = await c.post(CHAT, json=BODY)
            tg.cancel_scope.cancel()  # the client goes away; the server task is cancelled
        assert busy.status_code == 429 and busy.json()["dimension"] == "concurrency"
        assert await limiter.backend.in_flight(principal_of("k1")) == 0  # type: ignore[attr-defined]
        assert (await c.post(CHAT, json=BODY)).status_code == 200


async def test_lease_released_when_the_server_cancels_the_app() -> None:
    limiter = RateLimiter(Policy(concurrency=1))
    app = make_app(limiter)
    scope: dict[str, Any] = {
        "type": "http", "method": "POST", "path": CHAT, "raw_path": CHAT.encode(),
        "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                          (b"authorization", b"Bearer k1")],
        "client": ("127.0.0.1", 1), "server": ("t", 80), "scheme": "http",
        "http_version": "1.1", "root_path": "", "asgi": {"version": "3.0"},
    }
    import json

    sent_body = False

    async def receive() -> dict[str, Any]:  # like a server: the body once, then nothing
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps({**BODY, "sleep": 30}).encode()}
        await anyio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
        with anyio.fail_after(10):  # admitted: the lease is held while the model runs
            while not await limiter.backend.in_flight(principal_of("k1")):  # type: ignore[attr-defined]  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # (the endpoint is asleep by now, or on its way to it)
        tg.cancel_scope.cancel()  # the server cancels the app while it holds the lease
    ctx = scope["state"][SCOPE_KEY]
    assert ctx.state["ratelimit"].lease is not None
    assert await limiter.backend.in_flight(principal_of("k1")) == 0  # type: ignore[attr-defined]


def test_configuration_is_validated_eagerly() -> None:
    with pytest.raises(ValueError):
        Policy(requests="lots")
    with pytest.raises(ValueError):
        Policy(tokens="1.5/minute")
    with pytest.raises(ValueError):
        Policy(requests="1/minute;2/minute")
    with pytest.raises(ValueError):
        RateLimiter(Policy(cost="1/day"))  # no price table
    with pytest.raises(ValueError):
        RateLimiter({"free": Policy(requests="1/second")})  # no default tier
    with pytest.raises(ValueError):
        RateLimiter(Policy(requests="1/second"), alert_fractions=(0.5,))
    p = Policy(requests="10/second;1000/day", cost="2.5/day", concurrency=2)
    assert [(lim.dimension, lim.amount, lim.window) for lim in p.limits] == [
        ("requests", 10, 1), ("requests", 1000, 86400), ("cost", 2_500_000_000, 86400)]



def test_an_option_of_the_wrong_kind_says_what_it_takes() -> None:
    # A number where a limit string is meant failed with "'int' object is not iterable"; an
    # output_estimate of "100" with "'<' not supported"; models="gpt-4o" with an
    # AttributeError; alert_fractions=0.5 with "'float' object is not iterable".
    for dim, bad in (("requests", 5), ("tokens", 1000.0), ("cost", [2.5]), ("requests", b"5/s")):
        with pytest.raises(TypeError, match=f"^{dim} takes a limit string such as '"):
            Policy(**{dim: bad})
    for option, bad in (("output_estimate", "100"), ("output_estimate", 1.5),
                        ("concurrency", "5")):
        with pytest.raises(ValueError, match=f"^{option} must be .*got {bad!r}"):
            Policy(**{option: bad})
    with pytest.raises(TypeError, match=r"^models takes a mapping of model name to Policy"):
        Policy(models="gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must map a model name to a Policy"):
        Policy(models={"gpt-4o": "30000/minute"})  # type: ignore[dict-item]
    for fractions in (0.5, "0.5"):
        with pytest.raises(TypeError, match=r"^alert_fractions takes a sequence .*\(0.5, 0.9\)"):
            RateLimiter(Policy(cost="1/day"), prices=PRICES, alert_fractions=fractions,
                        on_alert=print)  # type: ignore[arg-type]
    # routes as a list (or one path) failed with "'list' object has no attribute 'items'",
    # a key that is not a str with "'int' object has no attribute 'startswith'".
    for routes in ([("/v1/embeddings", Policy(tokens="9/minute"))], "/v1/embeddings"):
        with pytest.raises(TypeError, match=r"^routes takes a mapping of path .* such as "
                                            r"\{'/v1/embeddings': Policy\(tokens="):
            RateLimiter(Policy(requests="5/minute"), routes=routes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^routes\[1\] must map a path to a Policy"):
        RateLimiter(Policy(requests="5/minute"),
                    routes={1: Policy(requests="1/minute")})  # type: ignore[dict-item]
    # tier or overrides neither a mapping nor a callable was called on each request: every
    # request a 500 ("the first argument must be callable").
    tiers = {"default": Policy(requests="5/minute"), "pro": Policy(requests="9/minute")}
    with pytest.raises(TypeError, match=r"^tier takes a mapping of principal to tier name, "
                                        r"such as \{'sk-1': 'pro'\}.*default_tier='pro'"):
        RateLimiter(tiers, tier="pro")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^tier takes a mapping .*got \['pro'\]$"):
        RateLimiter(tiers, tier=["pro"])  # type: ignore[arg-type]
    for bad in ("pro", Policy(requests="1/minute")):
        with pytest.raises(TypeError, match=r"^overrides takes a mapping of principal to Policy"):
            RateLimiter(tiers, overrides=bad)  # type: ignore[arg-type]
    RateLimiter(tiers, tier={"sk-1": "pro"}.get, overrides={"sk-2": "pro"})
    with pytest.raises(ValueError, match="alert_fractions must be in"):
        RateLimiter(Policy(cost="1/day"), prices=PRICES, alert_fractions=("0.5",),
                    on_alert=print)  # type: ignore[arg-type]
    p = Policy(requests=["5/minute", "100/day"], output_estimate=0)
    assert p.requests == ("5/minute", "100/day") and len(p.limits) == 2
    limiter = RateLimiter(Policy(cost="1/day"), prices=PRICES, alert_fractions=[0.9, 0.5],
                          on_alert=print)
    assert limiter.alert_fractions == (0.5, 0.9)


def test_limits_whose_header_names_would_clash_are_refused() -> None:
    # A scope's value keeps letters, digits, '.', '_' and '-' in a limit's name: "a/b" and
    # "a:b" are one name in RateLimit-Policy, RateLimit and violated-policies, while their
    # counters (the storage field keeps the value) stay apart. Both were accepted.
    a_slash, a_colon = (Policy(tokens="5/minute").limits[0].scoped(f"model:{m}")
                        for m in ("a/b", "a:b"))
    assert a_slash.name == a_colon.name and a_slash.field != a_colon.field
    with pytest.raises(ValueError, match=r"^models 'a/b' and 'a:b' would both name their "
                                         r"limits 'model-a_b-tokens-1m'"):
        Policy(tokens="1000/minute", models={"a/b": Policy(tokens="5/minute"),
                                             "a:b": Policy(tokens="9/minute")})
    with pytest.raises(ValueError, match=r"^routes '/v1/a/b' and '/v1/a_b' would both name "
                                         r"their limits 'route-_v1_a_b-requests-1m'"):
        RateLimiter(Policy(requests="9/minute"), routes={"/v1/a/b": Policy(requests="1/minute"),
                                                         "/v1/a_b": Policy(requests="2/minute")})
    # (a route's per-model limit is named for route:<path>|model:<name>)
    with pytest.raises(ValueError, match=r"^routes '/v1/x' and '/v1/x\|model:m' would both"):
        RateLimiter(Policy(requests="9/minute"), routes={
            "/v1/x": Policy(models={"m": Policy(requests="1/minute")}),
            "/v1/x|model:m": Policy(requests="2/minute"),
        })
    # Names that differ are kept: another window, '.' (kept as is), a long id cut to a digest
    Policy(models={"a/b": Policy(tokens="5/minute"), "a:b": Policy(tokens="5/hour"),
                   "a.b": Policy(tokens="5/minute"),
                   "x" * 50 + "/": Policy(tokens="5/minute"),
                   "x" * 50 + ":": Policy(tokens="5/minute")})
    RateLimiter(Policy(requests="9/minute"), routes={"/v1/a/b": Policy(requests="1/minute"),
                                                     "/v1/a.b": Policy(requests="2/minute")})


async def test_stream_is_reconciled_with_usage_reported_at_its_end() -> None:
    from fastapi import FastAPI

    import aimiddleware
    from aimiddleware import report_usage

    limiter = RateLimiter(Policy(tokens="100000/minute", concurrency=2))
    app = FastAPI()

    @app.post(CHAT)
    async def stream() -> StreamingResponse:
        async def events() -> Any:
            for i in range(3):
                yield f"data: {i}\n\n"
            report_usage({"input_tokens": 7, "output_tokens": 3})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    aimiddleware.install(app, ratelimit=limiter)
    async with client(app) as c:
        r = await c.post(CHAT, json={**BODY, "max_tokens": 4000})
        assert r.status_code == 200 and r.text.endswith("[DONE]\n\n")
        assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100000 - 4000
        assert await counters(limiter, "k1") == {"tokens:60": 10}
        assert await limiter.backend.in_flight(principal_of("k1")) == 0  # type: ignore[attr-defined]


async def test_install_with_usage_layer_reconciles_a_proxied_openai_response(
    storage: Storage,
) -> None:
    from fastapi import FastAPI

    import aimiddleware
    from aimiddleware import UsageConfig

    app = FastAPI()

    @app.post(CHAT)
    async def proxied() -> dict[str, Any]:  # what a provider proxy returns: usage in the body
        return {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}

    aimiddleware.install(
        app, storage=storage, usage=UsageConfig(prices=PRICES, record=False),
        ratelimit=Policy(tokens="100000/minute", cost="1/day"),
    )
    layers = app.user_middleware[0].kwargs["layers"]
    limiter = next(options["limiter"] for _, options in layers if "limiter" in options)
    async with client(app) as c:
        r = await c.post(CHAT, json={**BODY, "max_tokens": 3000})
    assert r.status_code == 200
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100000 - 3000  # reserved up front
    held = await counters(limiter, "k1")
    assert held["tokens:60"] == 15  # then replaced by the usage the response reported
    assert 0 < held["cost:86400"] < 10_000  # priced on 11 in + 4 out, not on 3000 out


async def test_exempt_paths_and_non_http_scopes_pass_through() -> None:
    from aimiddleware import ErrorMiddleware, RateLimitMiddleware, RequestContextMiddleware

    calls: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    limited_app = RateLimitMiddleware(
        inner, Policy(requests="1/minute"), exempt=["/health", "/static/*"]
    )
    app = RequestContextMiddleware(ErrorMiddleware(limited_app))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        exempt = [await c.get(p) for p in ("/health", "/static/a", "/health")]
        limited = [await c.get("/v1/x") for _ in range(2)]
    assert [r.status_code for r in exempt] == [200, 200, 200]
    assert all("ratelimit" not in r.headers for r in exempt)
    assert limited[0].status_code == 200
    assert limited[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert limited[1].status_code == 429

    async def no_receive() -> Any:
        raise AssertionError("not called")

    async def no_send(message: Any) -> None:
        raise AssertionError("not called")

    await limited_app({"type": "lifespan"}, no_receive, no_send)
    assert calls[-1] == "lifespan"


def test_exempt_paths_given_as_one_string_or_without_a_slash_are_refused() -> None:
    # A bare str was taken for its characters: "/health" exempted "/" (and "h", "e"...)
    # and left /health limited, silently.
    from fastapi import FastAPI

    from aimiddleware import RateLimitMiddleware, install

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    policy = Policy(requests="1/minute")
    with pytest.raises(TypeError, match=r"\('/health',\)"):
        install(FastAPI(), ratelimit=policy, ratelimit_exempt="/health")
    with pytest.raises(TypeError, match="sequence of paths"):
        RateLimitMiddleware(inner, policy, exempt="/health")
    with pytest.raises(ValueError, match="must start with '/', got 'health'"):
        install(FastAPI(), ratelimit=policy, ratelimit_exempt=("health",))
    install(FastAPI(), ratelimit=policy, ratelimit_exempt=["/health", "/static/*"])


async def test_admit_takes_no_extra_policy() -> None:
    """``RateLimiter.admit(ctx, extra=Policy)`` was undocumented and no layer passed it:
    given, the extra policy's unscoped limits took the main policy's names and storage
    fields (one response carried two ``requests-1m`` members; a counter shared by both was
    charged twice). Removed: scope a route's limits with ``routes=``; ``admit`` takes the
    context (and the body's content type) only."""
    from aimiddleware.context import RequestContext

    limiter = RateLimiter(Policy(requests="10/minute"))
    ctx = RequestContext(request_id="r", principal="p", method="POST", path="/v1/chat")
    for call in (
        lambda: limiter.admit(ctx, extra=Policy(requests="5/minute")),  # type: ignore[call-arg]
        lambda: limiter.admit(ctx, Policy(requests="5/minute")),  # type: ignore[misc]
    ):
        with pytest.raises(TypeError):
            await call()
    admission = await limiter.admit(ctx, content_type=b"application/json")
    policy = dict(admission.raw_headers)[b"ratelimit-policy"]
    assert policy.count(b'"requests-1m"') == 1
