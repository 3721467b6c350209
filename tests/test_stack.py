"""install(): the documented order, one config object, any ASGI app."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import aimiddleware
from aimiddleware import ErrorMiddleware, RequestContextMiddleware, StackConfig, install
from aimiddleware.context import current
from aimiddleware.stack_middleware import StackMiddleware


def layers(app: Starlette) -> list[tuple[type, dict[str, Any]]]:
    (stack,) = app.user_middleware  # install() adds one middleware: the whole stack
    assert stack.cls is StackMiddleware  # type: ignore[comparison-overlap]
    return list(stack.kwargs["layers"])


def layer_order(app: Starlette) -> list[type]:
    return [cls for cls, _ in layers(app)]


def test_install_adds_layers_outermost_first() -> None:
    app = install(Starlette())
    order = layer_order(app)
    assert order[:2] == [RequestContextMiddleware, ErrorMiddleware]


def test_install_options_override_the_config() -> None:
    cfg = StackConfig(max_body_size=10)
    app = install(Starlette(), cfg, request_id_header="x-correlation-id")
    cls, options = layers(app)[0]
    assert cls is RequestContextMiddleware
    assert options["max_body_size"] == 10
    assert options["request_id_header"] == "x-correlation-id"


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(TypeError):
        install(Starlette(), bogus=1)


async def test_install_wraps_a_plain_asgi_app() -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        if current().path == "/boom":
            raise aimiddleware.NotFound("nothing here")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = install(raw)
    assert isinstance(wrapped, StackMiddleware)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url="http://t"
    ) as c:
        ok = await c.get("/")
        boom = await c.get("/boom")
    assert ok.text == "ok" and ok.headers["x-request-id"]
    assert boom.status_code == 404 and boom.json()["detail"] == "nothing here"
