"""Batches through a real uvicorn server: 100 items, some failing, per-item results and counts."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from aimiddleware.errors import ContentFiltered
from aimiddleware.jobs import CallbackPolicy, JobContext, JobsRouter
from aimiddleware.jobs.memory import MemoryJobStore
from tests.jobs_servers import ThreadServer


class Item:
    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    async def fn(self, ctx: JobContext, input: Any) -> Any:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            await anyio.sleep(float(input.get("delay", 0.01)))
            await ctx.record_usage({"input_tokens": 3, "output_tokens": 2}, cost="0.001")
            n = input["n"]
            if n % 10 == 3:
                raise ContentFiltered("Item refused.")
            if n % 10 == 7:
                raise RuntimeError("boom with private detail")
            return {"square": n * n}
        finally:
            with self.lock:
                self.active -= 1


def app_for(item: Item, **options: Any) -> Starlette:
    jobs = JobsRouter(item.fn, batch_concurrency=8, **options)
    return Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)


async def wait_terminal(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            body: dict[str, Any] = (await client.get(path)).json()
            if body["status"] in {"completed", "failed", "cancelled", "expired"}:
                return body
            await anyio.sleep(0.05)


async def test_batch_of_100_with_failures() -> None:
    item = Item()
    with ThreadServer(app_for(item)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            items = [{"custom_id": f"req-{n}", "input": {"n": n}} for n in range(100)]
            r = await client.post("/v1/batches", json={"items": items})
            assert r.status_code == 202
            batch_id = r.json()["id"]
            assert batch_id.startswith("batch_")
            assert r.headers["location"] == f"/v1/batches/{batch_id}"
            events = []
            async with aconnect_sse(client, "GET", f"/v1/batches/{batch_id}/events") as es:
                async for sse in es.aiter_sse():
                    events.append(sse)
            assert events[-1].event == "batch.completed"
            assert sum(e.event == "batch.progress" for e in events) == 100
            batch = await wait_terminal(client, f"/v1/batches/{batch_id}")
            assert batch["status"] == "completed"  # failing items never fail the batch
            assert batch["counts"] == {"processing": 0, "succeeded": 80, "errored": 20,
                                       "cancelled": 0, "expired": 0}
            assert batch["total"] == 100 and batch["usage"]["total_tokens"] == 500
            assert batch["cost"] == "0.100"
            res = await client.get(f"/v1/batches/{batch_id}/results")
            assert res.headers["content-type"].startswith("application/jsonl")
            lines = [json.loads(line) for line in res.text.splitlines()]
    assert len(lines) == 100
    by_id = {line["custom_id"]: line for line in lines}
    assert set(by_id) == {f"req-{n}" for n in range(100)}
    for n in range(100):
        line = by_id[f"req-{n}"]
        if n % 10 == 3:
            assert line["type"] == "errored" and line["error"]["code"] == "content_filtered"
        elif n % 10 == 7:
            assert line["type"] == "errored" and line["error"]["code"] == "internal"
            assert "private" not in json.dumps(line)
        else:
            assert line == {"custom_id": f"req-{n}", "type": "succeeded",
                            "output": {"square": n * n}, "error": None}
    assert 1 < item.peak <= 8  # bounded concurrency


async def test_batch_cancel_marks_unfinished_items() -> None:
    item = Item()
    with ThreadServer(app_for(item)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            # Ten quick items, then thirty that would run for a minute: the batch is
            # cancelled mid-run however slow the machine is (8 at a time, in order).
            items = [{"custom_id": f"c{n}", "input": {"n": n * 10,
                                                      "delay": 0.05 if n < 10 else 60}}
                     for n in range(40)]
            batch_id = (await client.post("/v1/batches", json={"items": items})).json()["id"]
            with anyio.fail_after(10):
                while True:
                    running = (await client.get(f"/v1/batches/{batch_id}")).json()
                    if running["counts"]["succeeded"] == 10:
                        break
                    await anyio.sleep(0.02)
            cancelled = (await client.delete(f"/v1/batches/{batch_id}")).json()
            assert cancelled["status"] == "cancelled"
            c = cancelled["counts"]
            assert c["succeeded"] == 10 and c["cancelled"] == 30
            assert c["succeeded"] + c["cancelled"] == 40 and c["processing"] == 0
            again = (await client.delete(f"/v1/batches/{batch_id}")).json()
            assert again == cancelled
            lines = (await client.get(f"/v1/batches/{batch_id}/results")).text.splitlines()
            assert sorted(json.loads(x)["custom_id"] for x in lines) == sorted(
                f"c{n}" for n in range(40))


async def test_batch_expiry_and_validation() -> None:
    item = Item()
    with ThreadServer(app_for(item, timeout=0.3)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            items = [{"custom_id": f"e{n}", "input": {"n": 0, "delay": 0.25}} for n in range(24)]
            batch_id = (await client.post("/v1/batches", json={"items": items})).json()["id"]
            batch = await wait_terminal(client, f"/v1/batches/{batch_id}")
            assert batch["status"] == "expired"
            assert batch["counts"]["expired"] > 0
            assert batch["counts"]["succeeded"] + batch["counts"]["expired"] == 24
            lines = [json.loads(x) for x in
                     (await client.get(f"/v1/batches/{batch_id}/results")).text.splitlines()]
            expired = [x for x in lines if x["type"] == "expired"]
            assert expired and all(x["error"]["code"] == "batch_expired" for x in expired)

            dup = [{"custom_id": "same"}, {"custom_id": "same"}]
            r = await client.post("/v1/batches", json={"items": dup})
            assert r.status_code == 400
            assert (await client.post("/v1/batches", json={"items": []})).status_code == 400
            other = await client.get(f"/v1/batches/{batch_id}",
                                     headers={"authorization": "Bearer someone-else"})
            assert other.status_code == 404


async def test_batch_submit_is_idempotent_and_keys_are_per_route() -> None:
    item = Item()
    with ThreadServer(app_for(item)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            key = {"idempotency-key": "batch-key-1"}
            body = {"items": [{"custom_id": "a", "input": {"n": 2}}]}
            first = await client.post("/v1/batches", json=body, headers=key)
            again = await client.post("/v1/batches", json=body, headers=key)
            assert again.json()["id"] == first.json()["id"]
            assert again.headers["idempotent-replayed"] == "true"
            other = await client.post("/v1/batches", json={"items": [{"custom_id": "b"}]},
                                      headers=key)
            assert other.status_code == 422
            job = await client.post("/v1/jobs", json={"input": {"n": 1}}, headers=key)
            assert job.status_code == 202 and job.json()["id"].startswith("job_")
            done = await wait_terminal(client, f"/v1/batches/{first.json()['id']}")
            assert done["counts"]["succeeded"] == 1


class CountingStore(MemoryJobStore):
    """The in-process store, counting how often a record is written."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0
        self.result_writes = 0

    async def put(self, principal: str, rec_id: str, data: str, *, worker: bool = False) -> None:
        self.puts += 1
        await super().put(principal, rec_id, data, worker=worker)

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None:
        self.result_writes += 1
        await super().append_result(principal, rec_id, line, worker=worker)

    async def append_results(
        self, principal: str, rec_id: str, lines: Sequence[str], *, worker: bool = False
    ) -> None:
        self.result_writes += 1
        await super().append_results(principal, rec_id, lines, worker=worker)


async def test_a_big_batch_writes_its_record_a_bounded_number_of_times() -> None:
    # Each record write holds every item: one per finished item made a batch quadratic
    # (20,000 items took minutes to cancel, and the batch was reported lost meanwhile).
    store = CountingStore()
    item = Item()
    with ThreadServer(app_for(item, store=store)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            items = [{"custom_id": f"q{n}", "input": {"n": 0, "delay": 0}} for n in range(2000)]
            batch_id = (await client.post("/v1/batches", json={"items": items})).json()["id"]
            done = await wait_terminal(client, f"/v1/batches/{batch_id}")
            assert done["counts"]["succeeded"] == 2000 and done["usage"]["total_tokens"] == 10_000
            assert store.puts < 200  # (a write per 0.2 s while running, and the ends)
            async with aconnect_sse(client, "GET", f"/v1/batches/{batch_id}/events") as es:
                events = [sse.event async for sse in es.aiter_sse()]
            assert events.count("batch.progress") == 2000  # every item still reported

            slow = [{"custom_id": f"s{n}", "input": {"n": 0, "delay": 60}} for n in range(5000)]
            batch_id = (await client.post("/v1/batches", json={"items": slow})).json()["id"]
            with anyio.fail_after(10):
                while item.active < 8:  # noqa: ASYNC110 - set from the server thread
                    await anyio.sleep(0.02)
            before, results_before = store.puts, store.result_writes
            with anyio.fail_after(10):
                cancelled = (await client.delete(f"/v1/batches/{batch_id}")).json()
            assert cancelled["status"] == "cancelled"
            assert cancelled["counts"]["cancelled"] == 5000
            assert store.puts - before <= 3  # the leftovers at once, then the final record
            # ... their lines too: in bulk, not a round trip each (to a shared store)
            assert store.result_writes - results_before == 1
            lines = (await client.get(f"/v1/batches/{batch_id}/results")).text.splitlines()
            assert len(lines) == 5000


class WireStore(MemoryJobStore):
    """The in-process store, with chosen writes taking ``delay`` s to land, as a command on
    the wire to Redis does: a caller cancelled while waiting does not stop it landing."""

    def __init__(self, delay: float = 0.3) -> None:
        super().__init__()
        self.delay = delay
        self.slow_put: Any = lambda data: False
        self.slow_result: Any = lambda line: False
        self.in_flight = anyio.Event()

    async def _on_the_wire(self, land: Any) -> None:
        import asyncio

        landed = asyncio.Event()

        def arrive() -> None:
            land()
            landed.set()

        asyncio.get_running_loop().call_later(self.delay, arrive)
        self.in_flight.set()
        await landed.wait()

    async def put(self, principal: str, rec_id: str, data: str, *, worker: bool = False) -> None:
        if not self.slow_put(data):
            return await super().put(principal, rec_id, data, worker=worker)
        await self._on_the_wire(lambda: self._records.__setitem__((principal, rec_id), data))

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None:
        if not self.slow_result(line):
            return await super().append_result(principal, rec_id, line, worker=worker)
        await self._on_the_wire(
            lambda: self._results.setdefault((principal, rec_id), []).append(line))


async def fast_or_stuck(ctx: JobContext, input: Any) -> Any:
    if input.get("stuck"):
        await anyio.sleep(60)
    return {"ok": True}


async def cancel_when_in_flight(
    store: WireStore, record: Any = None, fn: Any = fast_or_stuck
) -> dict[str, Any]:
    """Run ``record`` (default: a batch of one quick item and one stuck one) with ``fn``;
    cancel it while a write is on the wire; the stored record once every write has landed."""
    from aimiddleware.jobs import Batch
    from aimiddleware.jobs.models import BatchCounts, BatchItem
    from aimiddleware.jobs.runner import JobRunner

    if record is None:
        items = [BatchItem(custom_id="quick", input={}),
                 BatchItem(custom_id="stuck", input={"stuck": True})]
        record = Batch(id="batch_wire", principal="p", items=items, total=2,
                       counts=BatchCounts(processing=2))
    runner = JobRunner(fn, store)
    await store.create("p", record.id, record.stored(), None)
    async with runner.running():
        runner.submit(record)
        with anyio.fail_after(5):
            await store.in_flight.wait()
        runner.cancel_local(record.id)
        with anyio.fail_after(5):
            while True:  # (polling the store, as a client does)
                if json.loads(await store.get("p", record.id) or "{}")["status"] == "cancelled":
                    break
                await anyio.sleep(0.01)
    await anyio.sleep(store.delay + 0.2)  # every write on the wire has landed
    return dict(json.loads(await store.get("p", record.id) or "{}"))


async def test_a_record_write_on_the_wire_at_cancel_lands_before_the_final_one() -> None:
    # The saver's write of the running record was cancelled with the batch, but a command
    # already sent still lands: after the final record, putting the batch back in_progress
    # (and then reaped as worker_lost).
    store = WireStore()
    store.slow_put = lambda data: json.loads(data)["counts"] == {  # the saver's write
        "processing": 1, "succeeded": 1, "errored": 0, "cancelled": 0, "expired": 0}
    final = await cancel_when_in_flight(store)
    assert final["status"] == "cancelled"
    assert final["counts"] == {"processing": 0, "succeeded": 1, "errored": 0, "cancelled": 1,
                               "expired": 0}


async def test_an_item_finishing_as_its_batch_is_cancelled_is_counted_once() -> None:
    # The item was marked done, but its result write was cancelled with the batch: it was
    # neither counted nor marked cancelled (counts summed to less than the total).
    store = WireStore()
    store.slow_result = lambda line: '"quick"' in line
    final = await cancel_when_in_flight(store)
    assert final["counts"] == {"processing": 0, "succeeded": 1, "errored": 0, "cancelled": 1,
                               "expired": 0}
    lines = [json.loads(x) for x in await store.results("p", "batch_wire")]
    assert sorted((x["custom_id"], x["type"]) for x in lines) == [
        ("quick", "succeeded"), ("stuck", "cancelled")]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_batch_whose_worker_died_reports_the_items_it_finished(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # The running record is written at most every 0.2 s, the results at once: a worker dying
    # in between left a failed batch whose counts missed items its results file has.
    from aimiddleware.jobs import Batch
    from aimiddleware.jobs.models import BatchCounts, BatchItem, BatchItemResult
    from aimiddleware.jobs.store import make_store
    from aimiddleware.storage import Storage

    url = "memory://" if backend == "memory" else request.getfixturevalue("redis_url")
    jobs = JobsRouter(Item().fn, storage=url, principal=lambda request: "p")
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    # (the server's own store in memory; a client of the same Redis else: its loop is ours)
    own = None if backend == "memory" else Storage(url)
    store = jobs.store if own is None else make_store(own)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            items = [BatchItem(custom_id=f"c{n}", input={"n": n}) for n in range(3)]
            dead = Batch(id="batch_from_a_dead_worker", principal="p", status="in_progress",
                         items=items, total=3, counts=BatchCounts(processing=2, succeeded=1))
            await store.put("p", dead.id, dead.stored())  # (its lease long gone)
            for custom_id, kind in (("c0", "succeeded"), ("c1", "errored")):
                line = BatchItemResult(custom_id=custom_id, type=kind)  # type: ignore[arg-type]
                await store.append_result("p", dead.id, line.model_dump_json())
            body = (await client.get(f"/v1/batches/{dead.id}")).json()
            assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
            # (the item it had not finished: an errored line, never left "processing")
            assert body["counts"] == {"processing": 0, "succeeded": 1, "errored": 2,
                                      "cancelled": 0, "expired": 0}
            lines = (await client.get(f"/v1/batches/{dead.id}/results")).text.splitlines()
            assert [json.loads(x)["custom_id"] for x in lines] == ["c0", "c1", "c2"]
            async with aconnect_sse(client, "GET", f"/v1/batches/{dead.id}/events") as es:
                final = [json.loads(e.data) async for e in es.aiter_sse()][-1]
            assert final["counts"] == body["counts"]
    if own is not None:
        await own.aclose()


class TwiceStore(MemoryJobStore):
    """Every result line lands twice, as one does when its write timed out on the wire,
    reached the store all the same, and was tried again."""

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None:
        await super().append_results(principal, rec_id, [line, line], worker=worker)

    async def append_results(
        self, principal: str, rec_id: str, lines: Sequence[str], *, worker: bool = False
    ) -> None:
        await super().append_results(principal, rec_id, [*lines, *lines], worker=worker)


async def test_a_result_line_written_twice_is_read_once() -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        received.append(await request.json())
        return Response(status_code=204)

    item = Item()
    jobs = JobsRouter(item.fn, store=TwiceStore(), webhook_secrets=["whsec_" + "A" * 32],
                      callback_policy=CallbackPolicy(schemes=("http",), allow_private=True),
                      webhook_poll_interval=0.05)
    app = Starlette(routes=[Mount("/v1", jobs), Route("/hook", hook, methods=["POST"])],
                    lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            items = [{"custom_id": f"req-{n}", "input": {"n": n}} for n in range(4)]
            r = await client.post("/v1/batches", json={"items": items,
                                                       "callback_url": f"{srv.url}/hook"})
            batch_id = r.json()["id"]
            assert (await wait_terminal(client, f"/v1/batches/{batch_id}"))["status"] == "completed"
            lines = (await client.get(f"/v1/batches/{batch_id}/results")).text.splitlines()
            with anyio.fail_after(10):
                while not received:  # noqa: ASYNC110 - the dispatcher posts it
                    await anyio.sleep(0.02)
    ids = [i["custom_id"] for i in items]
    assert sorted(json.loads(line)["custom_id"] for line in lines) == ids
    results = received[0]["data"]["results"]  # the webhook's inline results
    assert sorted(res["custom_id"] for res in results) == ids
