"""An existing FastAPI app; the last three lines add the whole stack (memory:// default)."""

from fastapi import FastAPI

app = FastAPI()


@app.post("/v1/chat/completions")
async def chat(body: dict) -> dict:  # type: ignore[type-arg]
    return {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


import aimiddleware  # noqa: E402
from aimiddleware import Policy, RateLimiter, StackConfig, UsageConfig  # noqa: E402

aimiddleware.install(app, StackConfig(ratelimit=RateLimiter(Policy(requests="60/minute")), usage=UsageConfig()))
