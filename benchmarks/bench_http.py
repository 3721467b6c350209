"""Requests per second over real HTTP: uvicorn on 127.0.0.1 and ``wrk`` as the load generator.

Each contender runs in its own uvicorn process (one worker); rounds are interleaved and the
median requests/s is reported with its ratio to bare Starlette. Needs ``wrk`` on PATH
(Debian: ``apt-get install wrk``); ``./dev bench`` installs it when it can.

Under two servers: uvicorn as ``pip install uvicorn`` gives it (h11 and asyncio), and as
``uvicorn[standard]`` (what ``fastapi[standard]`` installs, so most FastAPI deployments) gives
it (httptools and uvloop). The second's server costs less per request, so the same middleware
is a larger share of each: slowapi keeps ~0.74x of bare Starlette under the first and ~0.55x
under the second, which is the issue's anchor ("slowapi: 0.56x").
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.http_apps import PATH
from benchmarks.stack_apps import chat_body
from tests.redis_server import free_port

CONTENDERS = {
    "bare starlette": "benchmarks.http_apps:bare",
    "bare starlette + the stack's response headers": "benchmarks.http_apps:headers_only",
    "hand-written floor (the stack's work, one function)": "benchmarks.http_apps:floor",
    "slowapi (1 limit)": "benchmarks.http_apps:slowapi",
    "aimiddleware full stack": "benchmarks.http_apps:stack",
}


# Each server setup: its uvicorn options, and the modules it needs.
SERVERS = {
    "uvicorn (h11, asyncio)": (["--http", "h11", "--loop", "asyncio"], ()),
    "uvicorn[standard] (httptools, uvloop)": (
        ["--http", "httptools", "--loop", "uvloop"], ("httptools", "uvloop")
    ),
}


def _serve(target: str, port: int, options: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            target,
            "--port",
            str(port),
            "--log-level",
            "error",
            "--no-access-log",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{target} did not start")


# Every request: the chat body of the in-process benchmark, with an API key.
_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{json.dumps(chat_body())}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


def _wrk(port: int, seconds: int, script: str) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(out)
    return float(match.group(1))


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    if shutil.which("wrk") is None:
        return "## HTTP requests/s\n\nwrk is not installed; skipped.", {}
    sections, data = [], {}
    for server, (options, needs) in SERVERS.items():
        missing = [name for name in needs if importlib.util.find_spec(name) is None]
        if missing:
            sections.append(f"## HTTP requests/s under {server}\n\n"
                            f"{', '.join(missing)} not installed; skipped.")
            continue
        text, data[server] = _run_server(server, options, quick)
        sections.append(text)
    return "\n\n".join(sections), data


def _run_server(server: str, options: list[str], quick: bool) -> tuple[str, dict[str, Any]]:
    rounds, seconds = (2, 2) if quick else (5, 4)
    servers = {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(_SCRIPT)
    try:
        for name, target in CONTENDERS.items():
            port = free_port()
            servers[name] = (_serve(target, port, options), port)
        samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for _proc, port in servers.values():
            _wrk(port, 1, lua.name)  # warm-up
        for _ in range(rounds):
            for name, (_p, port) in servers.items():
                samples[name].append(_wrk(port, seconds, lua.name))
    finally:
        for proc, _port in servers.values():
            proc.terminate()
            proc.wait(10)
        Path(lua.name).unlink()
    base = statistics.median(samples["bare starlette"])
    lines = [
        f"## HTTP requests/s under {server}: the chat route (1 worker; wrk -t1 -c32, POST)",
        "",
        "| contender | median req/s | ratio to bare starlette |",
        "|---|---:|---:|",
    ]
    data = {}
    for name, values in samples.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:,.0f} | {med / base:.2f}x |")
        data[name] = {"median_rps": med, "ratio": med / base, "samples": values}
    return "\n".join(lines), data
