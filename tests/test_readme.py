"""The README is what a new user copies from: keep it honest.

Every ```python block compiles; every name it imports from ``aimiddleware``, and every
``aimiddleware.x.y`` the text names, exists; every call of a public name, in a block or in
the text, passes arguments its signature takes; the configuration reference and the error
table match the classes they describe (read from the code, not a copy of it); and the
blocks that can run here (no network, real parts: a real Valkey for the Redis URLs) run as
written, with only their placeholders filled in (``app``, a model function, the storage).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

import aimiddleware
import aimiddleware.client
import aimiddleware.errors
import aimiddleware.jobs
import aimiddleware.testing
from aimiddleware import AIError, IdempotencyConfig, StackConfig, Storage
from aimiddleware.client import RetryPolicy
from aimiddleware.jobs import WebhookSigner

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")

# -- reading the README -------------------------------------------------------------------------


def python_blocks(text: str = TEXT) -> list[tuple[int, str]]:
    """``(line, source)`` of every ```python block."""
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)
    ]


def section_block(marker: str, nth: int = 0) -> str:
    """The ``nth`` python block after ``marker`` (a heading or a ``<!-- section: -->``)."""
    at = TEXT.find(marker)
    assert at >= 0, f"README: {marker!r} is gone; update tests/test_readme.py"
    blocks = [src for line, src in python_blocks() if TEXT.count("\n", 0, at) + 1 < line]
    assert len(blocks) > nth, f"README: no python block #{nth} after {marker!r}"
    return blocks[nth]


def code_spans(text: str = TEXT) -> list[str]:
    """Inline code outside the fenced blocks, also across a line break (a table's escaped
    ``\\|`` unescaped)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`]+)`", prose)
    return [" ".join(s.split()).replace("\\|", "|") for s in spans if "\n\n" not in s]


def table(heading: str) -> list[list[str]]:
    """The rows (cells, header and rule left out) of the first table after ``heading``."""
    lines = TEXT[TEXT.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    return rows


# -- resolving names ----------------------------------------------------------------------------

PUBLIC: dict[str, Any] = {}
for _module in (aimiddleware, aimiddleware.jobs, aimiddleware.client, aimiddleware.testing):
    PUBLIC.update({name: getattr(_module, name) for name in _module.__all__})

# Callables whose ``**options`` are the fields of a config class.
OPTIONS_OF: dict[Any, type] = {
    aimiddleware.idempotent: IdempotencyConfig,
    aimiddleware.IdempotencyMiddleware: IdempotencyConfig,
    aimiddleware.client.RetryTransport: RetryPolicy,
    aimiddleware.client.AsyncRetryTransport: RetryPolicy,
}


def resolve_dotted(dotted: str) -> Any:
    """``aimiddleware.a.b.c``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the README names what is not there
        return obj
    raise ModuleNotFoundError(dotted)


def resolve(node: ast.expr, names: dict[str, Any]) -> Any | None:
    """The object a call's function names, when it is a public name (else ``None``)."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        dotted = ast.unparse(node)
        if dotted.startswith("aimiddleware."):
            return resolve_dotted(dotted)
        owner = resolve(node.value, names)
        if owner is not None and inspect.isclass(owner):
            return getattr(owner, node.attr)  # e.g. PriceTable.from_litellm
    return None


def imported_names(tree: ast.AST) -> dict[str, Any]:
    """What a block imports from ``aimiddleware`` (failing on a name that does not exist)."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aimiddleware"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("aimiddleware"):
                    importlib.import_module(alias.name)
    return names


def check_call(call: ast.Call, names: dict[str, Any], where: str) -> bool:
    """Do the call's arguments fit the signature? (``...`` stands for "and the rest".)"""
    target = resolve(call.func, names)
    if target is None or not callable(target):
        return False
    sig = inspect.signature(target)
    args = [a for a in call.args if not (isinstance(a, ast.Constant) and a.value is ...)]
    if any(isinstance(a, ast.Starred) for a in args):
        return False
    keywords = [k.arg for k in call.keywords if k.arg is not None]
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    named = [k for k in keywords if k in sig.parameters] if has_var_kw else keywords
    try:
        sig.bind_partial(*[None] * len(args), **dict.fromkeys(named))
    except TypeError as exc:
        raise AssertionError(f"{where}: {ast.unparse(call)}: {exc}") from None
    extra = sorted(set(keywords) - set(named))
    if extra:
        config = OPTIONS_OF.get(target)
        fields = {f.name for f in dataclasses.fields(config)} if config else None
        if fields is not None:
            assert set(extra) <= fields, f"{where}: {ast.unparse(call)}: no {extra} option"
    return True


# -- the blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "source"), python_blocks(), ids=lambda v: str(v)[:12])
def test_python_block_compiles_and_its_names_exist(line: int, source: str) -> None:
    tree = compile(source, f"README.md:{line}", "exec", ast.PyCF_ONLY_AST)
    names = {**PUBLIC, **imported_names(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            check_call(node, names, f"README.md:{line}")


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 10


def test_every_aimiddleware_name_in_the_text_exists() -> None:
    dotted = set(re.findall(r"\baimiddleware(?:\.[A-Za-z_]\w*)+", TEXT))
    assert len(dotted) >= 5
    for name in sorted(dotted):
        resolve_dotted(name)


def test_every_public_call_in_the_text_fits_its_signature() -> None:
    checked = 0
    for span in code_spans():
        try:
            tree = ast.parse(span, mode="eval")
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                checked += check_call(node, PUBLIC, f"README `{span}`")
    assert checked >= 20  # (the reader would not have noticed this test going blind)


def test_tables_have_as_many_cells_as_their_header() -> None:
    # An unescaped "|" in a cell (also inside `code`) splits it: GitHub drops the rest.
    header = 0
    for number, line in enumerate(TEXT.splitlines(), 1):
        if not line.startswith("|"):
            header = 0
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip()[1:-1]))
        if not header:
            header = cells
        assert cells == header, f"README.md:{number}: {cells} cells, the header has {header}"


def test_the_envelope_bullet_names_every_envelope_field() -> None:
    bullet = TEXT[TEXT.index("- **Envelope**:"):]
    bullet = bullet[: bullet.index("\n- ")]
    words = set(re.findall(r"\w+", " ".join(re.findall(r"`([^`]+)`", bullet))))
    missing = set(aimiddleware.Envelope.model_fields) - words
    assert not missing, f"README's Envelope bullet does not name {sorted(missing)}"


# -- the configuration reference ----------------------------------------------------------------

MIB = re.compile(r"(\d+) MiB")


def documented_value(text: str) -> Any:
    """A default as the README writes it: a literal, ``N MiB``, ``off``, or a bare string."""
    text = MIB.sub(lambda m: str(int(m.group(1)) * 2**20), text.strip())
    if text == "off":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def same(documented: Any, actual: Any) -> bool:
    if isinstance(actual, frozenset | set):
        return set(documented) == set(actual)
    if isinstance(actual, float | int) and not isinstance(actual, bool):
        return bool(documented == actual)
    return bool(documented == actual) and type(documented) is type(actual)


def field_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


CONFIG_ROWS = table("## Configuration reference")


def test_config_reference_lists_every_stack_config_field_with_its_default() -> None:
    defaults = field_defaults(StackConfig)
    documented = {row[0].strip("`"): row[1] for row in CONFIG_ROWS}
    assert sorted(documented) == sorted(defaults), "the table lists StackConfig's fields"
    for name, cell in documented.items():
        spans = re.findall(r"`([^`]+)`", cell)
        written = spans[0] if spans else cell
        actual = defaults[name]
        call = re.fullmatch(r"(\w+)\(\)", written)
        if call:  # e.g. CancellationConfig(): the default is that object
            assert actual == PUBLIC[call.group(1)](), f"{name}: default {written}"
        else:
            assert same(documented_value(written), actual), f"{name}: {written!r} != {actual!r}"


def config_calls() -> Iterator[tuple[str, ast.Call]]:
    for row in CONFIG_ROWS:
        for span in re.findall(r"`([^`]+)`", row[2]):
            if re.match(r"[A-Z]\w*Config\(", span):
                call = ast.parse(MIB.sub(r"(\1 * 2**20)", span), mode="eval").body
                assert isinstance(call, ast.Call)
                yield row[0].strip("`"), call


def test_config_reference_options_match_the_config_classes() -> None:
    seen = set()
    for field, call in config_calls():
        cls = PUBLIC[ast.unparse(call.func)]
        fields = field_defaults(cls)
        written = {k.arg: k.value for k in call.keywords}
        assert list(written) and set(written) == set(fields), (
            f"{field}: the README lists {sorted(written)}, {cls.__name__} has {sorted(fields)}"
        )
        for name, node in written.items():
            try:
                value = ast.literal_eval(node)
            except ValueError:
                value = eval(ast.unparse(node), {})  # sizes: (1 * 2**20)
            default = fields[name]
            assert same(value, default), f"{cls.__name__}.{name}: {value!r} != {default!r}"
        seen.add(cls)
    assert len(seen) == 4  # cancellation, versioning, idempotency, usage


def test_error_table_matches_the_taxonomy() -> None:
    rows = table("<!-- section: errors -->")
    documented: dict[str, tuple[str, str]] = {}
    for row in rows:
        for codes, status, retryable in (row[0:3], row[4:7]):
            codes = re.sub(r"\([^)]*\)", "", codes)
            names = [c for c in re.split(r"[,/\s]+", codes) if c]
            statuses = status.split("/") if "/" in status else [status] * len(names)
            for code, st in zip(names, statuses, strict=True):
                documented[code] = (st, retryable)
    classes = [
        c for c in vars(aimiddleware.errors).values()
        if inspect.isclass(c) and issubclass(c, AIError) and c is not AIError
    ]
    assert len(classes) >= 25
    for cls in classes:
        assert cls.code in documented, f"{cls.__name__} ({cls.code}) is not in the error table"
        status, retryable = documented[cls.code]
        if status != "any":
            assert status == str(cls.default_status), f"{cls.code}: {status}"
        assert retryable == ("yes" if cls.retryable else "no"), f"{cls.code}: {retryable}"
    assert set(documented) == {c.code for c in classes}


# -- running the blocks -------------------------------------------------------------------------


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://readme")


def existing_app() -> FastAPI:
    """What "an existing FastAPI app" is in the quickstart: a route that answers with usage."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        message = {"role": "assistant", "content": "hi"}
        return {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}

    return app


async def my_model(body: Any) -> Any:
    for text in ("Hel", "lo"):
        yield text


def run(source: str, **names: Any) -> dict[str, Any]:
    """Execute a block with its placeholders given; a Redis URL points at ``STORAGE``."""
    source, found = re.subn(r'"redis://localhost:6379/0"', "STORAGE", source)
    assert found or "STORAGE" not in names, "the block no longer uses a Redis URL"
    namespace = {"__name__": "readme_block", **names}
    exec(compile(source, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture
async def redis_storage(redis_url: str) -> Any:
    store = Storage(redis_url)
    yield store
    await store.aclose()


async def test_quickstart_on_an_existing_app() -> None:
    app = existing_app()
    run(section_block("## Quickstart on an existing FastAPI app"), app=app)
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": []})
        schema = (await c.get("/openapi.json")).json()
    assert r.status_code == 200 and r.headers["x-usage-total-tokens"] == "6"
    assert r.headers["x-ratelimit-limit-requests"] == "60"
    assert r.headers["x-request-id"].startswith("req_")
    assert "Problem" in schema["components"]["schemas"]


async def test_the_retrying_client_block_builds_its_clients() -> None:
    namespace = run(section_block("## The retrying client"))
    assert namespace["client"].max_retries == 0
    await namespace["http"].aclose()


async def test_usage_block(
    redis_storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    price = {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}
    prices = {"claude-sonnet-4-5": price}
    (tmp_path / "model_prices_and_context_window.json").write_text(json.dumps(prices))
    monkeypatch.chdir(tmp_path)
    namespace = run(section_block("<!-- section: usage -->"), STORAGE=redis_storage)
    async with client(namespace["app"]) as c:
        r = await c.post("/v1/answer", json={"model": "claude-sonnet-4-5"})
        count = await c.post("/v1/count_tokens", json={"model": "gpt-4o", "input": "hello"})
    body = r.json()
    assert body["object"] == "envelope" and body["finish_reason"] == "stop"
    assert body["raw_finish_reason"] == "end_turn" and body["estimated_cost"] == "0.000636"
    assert r.headers["x-usage-estimated-cost"] == "0.000636"
    assert count.status_code == 200 and count.json()["exact"] is True


async def test_rate_limit_block(
    redis_storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "prices.json").write_text(json.dumps({"gpt-4o": {"input": 2.5, "output": 10}}))
    monkeypatch.chdir(tmp_path)
    app = FastAPI()
    run(section_block("<!-- section: ratelimit -->"), app=app, STORAGE=redis_storage)
    async with client(app) as c:
        answers = [await c.post("/v1/summarize", json={"text": "a long text"}) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert answers[0].json() == {"summary": "a long text"}
    assert answers[5].json()["dimension"] == "requests"


async def test_idempotency_block(
    redis_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDEMPOTENCY_SECRET", "a-long-shared-secret-for-the-test")
    runs: list[int] = []

    async def model(body: Any) -> dict[str, Any]:
        runs.append(1)
        return {"run": len(runs)}

    app = FastAPI()
    run(section_block("<!-- section: idempotency -->"), app=app, my_model=model,
        STORAGE=redis_storage)
    key = {"idempotency-key": "order-42"}
    async with client(app) as c:
        first = await c.post("/v1/chat/completions", json={"q": 1}, headers=key)
        again = await c.post("/v1/chat/completions", json={"q": 1}, headers=key)
        other = await c.post("/v1/chat/completions", json={"q": 2}, headers=key)
        keyless = await c.post("/v1/chat/completions", json={"q": 1})
    assert first.json() == {"run": 1} and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and keyless.status_code == 400
    assert runs == [1]


async def test_streaming_and_timeout_blocks() -> None:
    app = FastAPI()
    run(section_block("<!-- section: sse -->"), app=app, my_model=my_model)
    run(section_block("<!-- section: sse -->", 1), app=app)
    async with client(app) as c:
        body = {"model": "m", "messages": [], "stream": True,
                "stream_options": {"include_usage": True}}
        r = await c.post("/v1/chat/completions", json=body)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:2]] == [
        "Hel", "lo"
    ]
    assert json.loads(events[-2])["usage"]["total_tokens"] == 12 and events[-1] == "[DONE]"


async def test_versioning_block_answers_as_shown() -> None:
    namespace = run(section_block("<!-- section: versioning -->"))
    now = [datetime(2026, 3, 1, tzinfo=UTC)]
    namespace["registry"].clock = namespace["versions"].clock = lambda: now[0]
    async with client(namespace["app"]) as c:
        old = await c.post("/summarize", json={"model": "summarizer-2025-01-15"})
        now[0] = datetime(2026, 7, 1, tzinfo=UTC)
        gone = await c.post("/summarize", json={"model": "summarizer-2025-01-15"})
        future = await c.post("/summarize", json={}, headers={"api-version": "2027-01-01"})
    assert old.headers["x-model-version"] == "summarizer-2025-01-15"
    assert old.headers["deprecation"] == "@1767225600"
    assert old.headers["sunset"] == "Wed, 01 Jul 2026 00:00:00 GMT"
    assert old.headers["link"] in TEXT
    assert gone.status_code == 410 and gone.json()["detail"] in TEXT.replace("\n      ", " ")
    assert future.status_code == 400
    assert future.json()["supported_versions"] == ["2025-01-01", "2026-06-01"]


async def test_jobs_block(redis_storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", WebhookSigner.generate_secret())

    async def call_model(page: Any) -> str:
        return f"text of page {page}"

    namespace = run(section_block("<!-- section: jobs -->"), call_model=call_model,
                    STORAGE=redis_storage)
    app = namespace["app"]
    async with app.router.lifespan_context(app), client(app) as c:
        submitted = await c.post("/v1/jobs", json={"input": {"pages": [1, 2]}})
        job = await poll(c, submitted.headers["location"], lambda j: j["status"] == "completed")
    assert submitted.status_code == 202
    assert job["partial_output"] == ["text of page 1", "text of page 2"]
    assert job["steps"] == 2 and job["cost"] == "0.004" and job["result"] == {"summary": "..."}


async def poll(c: httpx.AsyncClient, url: str, done: Callable[[Any], bool]) -> Any:
    with anyio.fail_after(10):
        while True:
            job = (await c.get(url)).json()
            if done(job) or job["status"] == "failed":
                return job
            await anyio.sleep(0.02)
