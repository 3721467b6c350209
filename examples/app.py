"""The reference app: an OpenAI-compatible chat API behind the whole aimiddleware stack.

Run it with ``./dev app`` (memory://) and try::

    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
      -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

import aimiddleware


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int | None = None


app = FastAPI(title="aimiddleware reference app")


@app.post("/v1/chat/completions")
async def chat(body: ChatRequest) -> dict[str, Any]:
    ctx = aimiddleware.current()
    text = "echo: " + body.messages[-1].content if body.messages else ""
    return {
        "id": "chatcmpl-" + ctx.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
    }


aimiddleware.install(app)
