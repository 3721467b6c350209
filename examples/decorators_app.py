"""The decorators on a plain Starlette app: per-endpoint policies, no whole-app middleware
except the request context and errors (which every decorator builds on)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import (
    Completion,
    ErrorMiddleware,
    Policy,
    RequestContextMiddleware,
    Usage,
    deprecated,
    envelope,
    idempotent,
    rate_limit,
    register_exception_handlers,
)


@idempotent()  # outermost, as in the stack: a replay costs no quota
@rate_limit(Policy(requests="5/minute", tokens="20000/minute", output_estimate=64))
async def summarize(request: Request) -> JSONResponse:
    doc = (await request.json()).get("text", "")
    return JSONResponse({"summary": doc[:40], "chars": len(doc)})


@envelope(response=True)
async def answer(request: Request) -> Completion:
    question = (await request.json()).get("question", "")
    return Completion(
        output=f"You asked: {question}",
        usage=Usage(input_tokens=len(question.split()), output_tokens=4),
        finish_reason="end_turn",
        model_version="local-2026-06-01",
    )


@deprecated(deprecated="2026-01-01", sunset="2030-01-01", replacement="/v2/classify",
            successor_link="https://example.com/v2/classify")
async def classify_v1(request: Request) -> JSONResponse:
    return JSONResponse({"label": "positive"})


app = Starlette(
    routes=[
        Route("/summarize", summarize, methods=["POST"]),
        Route("/answer", answer, methods=["POST"]),
        Route("/v1/classify", classify_v1, methods=["POST"]),
    ]
)
app.add_middleware(ErrorMiddleware)
app.add_middleware(RequestContextMiddleware)
register_exception_handlers(app)  # the router's own 404/405 as problem+json too
