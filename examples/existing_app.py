"""An existing FastAPI app; the last lines add the whole stack (memory:// default)."""

from typing import Any

from fastapi import FastAPI

app = FastAPI()


@app.post("/v1/chat/completions")
async def chat(body: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": "hi"}
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    return {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}


# -- the whole change: ------------------------------------------------------------------------
import aimiddleware  # noqa: E402
from aimiddleware import Policy, StackConfig, UsageConfig  # noqa: E402

limits = Policy(requests="60/minute", tokens="100000/minute")
aimiddleware.install(app, StackConfig(ratelimit=limits, usage=UsageConfig()))
