"""Every process's /metrics after a small run of the whole system, checked against what
happened; a JSON log line; a traceparent that reaches the handler.

Gateway, dispatcher, worker and recorder run as users run them (``python -m ...``),
each with ``POLOS_METRICS_PORT``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from bench import broker_work
from schemas.topology import results_queue, submit_queue, work_queue
from tests.conftest import GatewayProcess, GatewayProcessFactory, Tenant, free_port
from tests.ops_support import Command, commands, label_values, scrape, value, wait_scrape
from tests.store_support import redis_url

DEPLOYMENT = "v1"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SUBMIT_ROUTE = "/api/v1/workflows/{workflow_id}/run"


class Run:
    """The system of one test, and what it was asked to do."""

    def __init__(
        self,
        gateway: GatewayProcess,
        tenant: Tenant,
        ports: dict[str, int],
        logs: dict[str, Command],
    ) -> None:
        self.gateway = gateway
        self.tenant = tenant
        self.ports = ports
        self.commands = logs
        self.session = aiohttp.ClientSession()

    async def submit(
        self, workflow: str, *, headers: dict[str, str] | None = None, **body: Any
    ) -> str:
        body.setdefault("payload", None)
        async with self.session.post(
            f"{self.gateway.url}/api/v1/workflows/{workflow}/run",
            json=body,
            headers={**self.tenant.headers, **(headers or {})},
        ) as response:
            assert response.status == 200, await response.text()
            execution_id: str = (await response.json())["execution_id"]
            return execution_id

    async def record(self, execution_id: str) -> dict[str, Any] | None:
        async with self.session.get(
            f"{self.gateway.url}/api/v1/executions/{execution_id}", headers=self.tenant.headers
        ) as response:
            if response.status != 200:
                return None
            record: dict[str, Any] = await response.json()
            return record

    async def wait_status(self, execution_id: str, status: str, *, within: float = 20) -> Any:
        deadline = time.monotonic() + within
        last = None
        while time.monotonic() < deadline:
            last = await self.record(execution_id)
            if last is not None and last["status"] == status:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"{execution_id} never became {status}: {last}")


@pytest.fixture
async def run(
    gateway_process: GatewayProcessFactory,
    tenant: Tenant,
    amqp_url: str,
    uid: str,
    tmp_path: Path,
    redis: aioredis.Redis,
    delete_queues: Callable[[str], None],
) -> AsyncIterator[Run]:
    for queue in ("echo", "fail", "slow", "keyed", "long", "traced"):
        delete_queues(submit_queue(uid, queue))
        delete_queues(results_queue(uid, queue))
    delete_queues(work_queue(uid, DEPLOYMENT))
    delete_queues(f"polos.recorder.{uid}")
    ports = {name: free_port() for name in ("gateway", "dispatcher", "worker", "recorder")}
    common = {"POLOS_AMQP_URL": amqp_url, "POLOS_REDIS_URL": redis_url()}
    prefix = f"test:{uid}:"
    async with commands(tmp_path) as start:
        await start(
            "recorder",
            env={
                **common,
                "POLOS_METRICS_PORT": str(ports["recorder"]),
                "POLOS_RECORDER_QUEUE": f"polos.recorder.{uid}",
                "POLOS_RECORDER_BINDING_KEY": f"{uid}.#",
                "POLOS_REDIS_KEY_PREFIX": prefix,
            },
        )
        dispatcher = await start(
            "dispatcher",
            env={
                **common,
                "POLOS_METRICS_PORT": str(ports["dispatcher"]),
                "POLOS_DISPATCHER_QUEUES": f"{uid}/*",
                "POLOS_DISPATCHER_DECLARE_RECORDER_QUEUE": "false",
                "POLOS_LOG_FORMAT": "json",
            },
        )
        worker = await start(
            "worker",
            "tests.workflows:make_worker",
            env={
                **common,
                "POLOS_METRICS_PORT": str(ports["worker"]),
                "POLOS_TEST_PROJECT": uid,
                "POLOS_TEST_DEPLOYMENT": DEPLOYMENT,
                "POLOS_LOG_FORMAT": "json",
            },
        )
        for name in ("recorder", "dispatcher", "worker"):
            await wait_scrape(ports[name])
        await worker.wait_for_line("consuming", within=20)  # its deployment is registered
        gateway = await gateway_process(
            tenant.projects_file,
            **common,
            POLOS_REDIS_KEY_PREFIX=prefix,
            POLOS_METRICS_PORT=str(ports["gateway"]),
        )
        the_run = Run(gateway, tenant, ports, {"dispatcher": dispatcher, "worker": worker})
        try:
            yield the_run
        finally:
            await the_run.session.close()


async def test_each_process_counts_what_happened_in_a_small_run(run: Run, uid: str) -> None:
    echoes = [await run.submit("echo", payload=i) for i in range(3)]
    failed = await run.submit("fail", payload="x")
    slow = await run.submit(
        "sleep", queue_name="slow", run_timeout_seconds=1, payload={"seconds": 30}
    )
    keyed = await run.submit(
        "sleep",
        queue_name="keyed",
        concurrency_key="k",
        queue_concurrency_limit=5,
        payload={"seconds": 2},
    )
    duplicate = await run.submit(
        "sleep", queue_name="keyed", concurrency_key="k", payload={"seconds": 2}
    )
    long = await run.submit("sleep", queue_name="long", payload={"seconds": 60})
    async with run.session.post(
        f"{run.gateway.url}/api/v1/workflows/echo/run",
        data=b"{not json",
        headers={**run.tenant.headers, "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400

    for execution_id in echoes:
        await run.wait_status(execution_id, "completed")
    await run.wait_status(failed, "failed")
    await run.wait_status(slow, "timed_out")
    await run.wait_status(duplicate, "deduplicated")
    await run.wait_status(keyed, "completed")
    await run.wait_status(long, "running")

    dispatcher = await scrape(run.ports["dispatcher"])
    transitions = "polos_queue_transitions_total"

    def count(queue: str, status: str) -> float:
        return value(dispatcher, transitions, project=uid, queue=queue, status=status)

    expected = {
        # queue: (admitted, completed, failed, timed_out, deduplicated, holding)
        "echo": (3, 3, 0, 0, 0, 0),
        "fail": (1, 0, 1, 0, 0, 0),
        "slow": (1, 0, 0, 1, 0, 0),
        "keyed": (1, 1, 0, 0, 1, 0),
        "long": (1, 0, 0, 0, 0, 1),
    }
    for queue, (
        admitted,
        completed,
        failed_n,
        timed_out,
        deduplicated,
        holding,
    ) in expected.items():
        statuses = ("admitted", "completed", "failed", "timed_out", "deduplicated")
        held = value(dispatcher, "polos_queue_holding", project=uid, queue=queue)
        seen = (*(count(queue, status) for status in statuses), held)
        assert seen == (admitted, completed, failed_n, timed_out, deduplicated, holding), queue
        # Every admitted execution is terminal or still holds its slot.
        ended = sum(count(queue, s) for s in ("completed", "failed", "timed_out", "cancelled"))
        assert count(queue, "admitted") == ended + holding, queue
    assert count("long", "running") == 1
    assert value(dispatcher, "polos_queue_concurrency_limit", project=uid, queue="keyed") == 5
    assert math.isinf(value(dispatcher, "polos_queue_concurrency_limit", project=uid, queue="echo"))
    assert value(dispatcher, "polos_dispatcher_queues", state="owned") == len(expected)
    assert value(dispatcher, "polos_dispatcher_sessions_total") == 1
    assert value(dispatcher, "polos_queue_admission_latency_seconds_count", project=uid) == 7
    # Every admission is in a confirmed ledger record before its work goes out.
    for queue in expected:
        kind = "record"
        records = value(
            dispatcher, "polos_queue_ledger_records_total", project=uid, queue=queue, kind=kind
        )
        assert records >= 1, queue
        assert value(dispatcher, "polos_queue_ledger_bytes_total", project=uid, queue=queue) > 0
    # What the benchmark reads of them (bench/broker_work.py): every series summed.
    total = await broker_work.scrape_ledger_records(run.ports["dispatcher"])
    assert total is not None
    assert total >= sum(
        value(dispatcher, "polos_queue_ledger_records_total", project=uid, queue=q, kind="record")
        for q in expected
    )

    gateway = await scrape(run.ports["gateway"])
    submits = "polos_gateway_requests_total"
    assert value(gateway, submits, route=SUBMIT_ROUTE, method="POST", status="200") == 8
    assert value(gateway, submits, route=SUBMIT_ROUTE, method="POST", status="400") == 1
    assert value(gateway, "polos_gateway_request_duration_seconds_count", route=SUBMIT_ROUTE) == 9
    assert value(gateway, "polos_gateway_publish_duration_seconds_count") >= 8
    assert value(gateway, "polos_gateway_confirms_in_flight") == 0
    assert "/api/v1/executions/{execution_id}" in label_values(gateway, submits, "route")

    worker = await scrape(run.ports["worker"])
    runs = "polos_worker_executions_total"
    assert value(worker, runs, workflow="echo", outcome="completed") == 3
    assert value(worker, runs, workflow="fail", outcome="failed") == 1
    assert value(worker, runs, workflow="sleep", outcome="timed_out") == 1
    assert value(worker, runs, workflow="sleep", outcome="completed") == 1
    assert value(worker, "polos_worker_running") == 1
    assert value(worker, "polos_worker_handler_duration_seconds_count", workflow="echo") == 3
    # Each first run's wait from its submission's creation: there, and plausible.
    waited = "polos_worker_start_latency_seconds"
    assert value(worker, f"{waited}_count", workflow="echo") == 3
    assert 0 < value(worker, f"{waited}_sum", workflow="echo") < 3 * 30

    recorder = await scrape(run.ports["recorder"])
    # queued (gateway) + what the dispatcher announced, every one written once.
    announced = value(dispatcher, transitions, project=uid)
    assert value(recorder, "polos_recorder_events_written_total") == 8 + announced
    assert value(recorder, "polos_recorder_backlog") == 0
    assert value(recorder, "polos_recorder_store_available") == 1


async def test_a_traceparent_reaches_the_handler_and_json_logs_carry_its_ids(
    run: Run, uid: str
) -> None:
    from_header = await run.submit("traced", headers={"traceparent": TRACEPARENT})
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    from_body = await run.submit(
        "traced", headers={"traceparent": TRACEPARENT}, otel_traceparent=other
    )
    ignored = await run.submit("traced", headers={"traceparent": "not-a-traceparent"})
    record = await run.wait_status(from_header, "completed")
    assert record["result"] == {"traceparent": TRACEPARENT}
    record = await run.wait_status(from_body, "completed")
    assert record["result"] == {"traceparent": other}, "the body's field wins"
    record = await run.wait_status(ignored, "completed")
    assert record["result"] == {"traceparent": None}

    # POLOS_LOG_FORMAT=json: every line is one object; the handler's line has its ids.
    execution_id = from_header
    for name in ("dispatcher", "worker"):
        lines = [line for line in run.commands[name].log().splitlines() if line.strip()]
        assert lines, name
        parsed = [json.loads(line) for line in lines]  # every line is one JSON object
        for entry in parsed:
            assert {"time", "level", "logger", "message"} <= set(entry), entry
    traced = [
        entry
        for entry in map(json.loads, run.commands["worker"].log().splitlines())
        if entry["message"] == "traced run" and entry.get("execution_id") == execution_id
    ]
    assert len(traced) == 1
    assert traced[0]["logger"] == "tests.workflows"
    assert traced[0]["execution_id"] == execution_id
    assert traced[0]["project_id"] == uid
    assert traced[0]["queue_name"] == "traced"
