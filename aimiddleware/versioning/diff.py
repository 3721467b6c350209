"""The differences between two responses to one request (pure, no I/O).

Reads usage, finish_reason and output text from the usual shapes: our context values
first (filled by the migration check), else an OpenAI-shaped (``prompt_tokens``,
``choices[0].message.content``) or Anthropic-shaped (``input_tokens``, ``content[].text``,
``stop_reason``) JSON body.
"""

from __future__ import annotations

import difflib
import json
from decimal import Decimal
from typing import Any

__all__ = ["compare", "finish_reason_from", "output_from", "usage_from"]

_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
)


def usage_from(raw: Any) -> dict[str, int] | None:
    """An OpenAI-shaped (prompt/completion) or Anthropic/our-shaped (input/output) usage."""
    if not isinstance(raw, dict):
        return None
    inp = raw.get("input_tokens", raw.get("prompt_tokens"))
    out = raw.get("output_tokens", raw.get("completion_tokens"))
    if not isinstance(inp, int) or not isinstance(out, int):
        return None
    total = raw.get("total_tokens")
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "total_tokens": total if isinstance(total, int) else inp + out,
    }


def finish_reason_from(data: dict[str, Any]) -> str | None:
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        value = choices[0].get("finish_reason")
        if isinstance(value, str):
            return value
    for key in ("finish_reason", "stop_reason"):
        if isinstance(data.get(key), str):
            return str(data[key])
    return None


def output_from(body: Any) -> str | None:
    """The text output in the usual shapes (OpenAI chat/completions/responses, Anthropic)."""
    if isinstance(body, str):
        return body
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        message = first.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
        if isinstance(first.get("text"), str):
            return str(first["text"])
    content = body.get("content")
    if isinstance(content, list):
        texts = [b.get("text") for b in content if isinstance(b, dict)]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(str(t) for t in texts)
    for key in ("output_text", "output", "text", "content"):
        if isinstance(body.get(key), str):
            return str(body[key])
    return json.dumps(body, sort_keys=True, default=str)


def _delta(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    if isinstance(a, str) or isinstance(b, str):
        return str(Decimal(str(b)) - Decimal(str(a)))
    return b - a


def compare(base: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """Pure: the differences between two side envelopes."""
    bu, cu = base.get("usage") or {}, cand.get("usage") or {}
    usage = {
        f: {"baseline": bu.get(f), "candidate": cu.get(f), "delta": _delta(bu.get(f), cu.get(f))}
        for f in _USAGE_FIELDS
        if f in bu or f in cu
    }
    bo, co = base.get("output"), cand.get("output")
    lines = list(
        difflib.unified_diff(
            (bo or "").splitlines(), (co or "").splitlines(), "baseline", "candidate", lineterm=""
        )
    )
    return {
        "status": {"baseline": base["status"], "candidate": cand["status"],
                   "changed": base["status"] != cand["status"]},
        "usage": usage,
        "estimated_cost": {
            "baseline": base.get("estimated_cost"),
            "candidate": cand.get("estimated_cost"),
            "delta": _delta(base.get("estimated_cost"), cand.get("estimated_cost")),
        },
        "finish_reason": {
            "baseline": base.get("finish_reason"),
            "candidate": cand.get("finish_reason"),
            "changed": base.get("finish_reason") != cand.get("finish_reason"),
        },
        "output": {
            "changed": bo != co,
            "similarity": round(difflib.SequenceMatcher(None, bo or "", co or "").ratio(), 4),
            "diff": lines,
        },
    }
