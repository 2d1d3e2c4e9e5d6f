"""End to end, every part in its own process where it runs in one in production:
HTTP gateway → ``python -m dispatcher`` → ``python -m worker`` fleet → result event."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aio_pika.abc import AbstractConnection

from schemas.dispatch import ExecutionStatus
from schemas.topology import results_queue, submit_queue, work_queue
from tests.conftest import GatewayFactory, ProbeFactory, Tenant, queue_depth
from tests.dispatcher_support import (
    DEPLOYMENT,
    EventLog,
    QueueKit,
    dispatcher_process,
    wait_for_log,
)
from tests.worker_harness import worker_process

S = ExecutionStatus
LEASE = 3.0


def dispatched(event_log: EventLog, execution_id: str) -> list[ExecutionStatus]:
    """The dispatcher's events of an execution (without the gateway's ``queued``)."""
    return [s for s in event_log.statuses(execution_id) if s is not S.QUEUED]


def _pid_of(worker_id: str) -> int:
    # "<hostname>-<pid>-<suffix>"; the hostname may itself contain dashes.
    return int(worker_id.rsplit("-", 2)[1])


async def test_submitted_over_http_run_by_a_worker_process_and_the_event_carries_the_result(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Callable[[str, str, list[str]], Awaitable[None]],
    event_log: EventLog,
    delete_queues: Callable[[str], None],
    processes: list[subprocess.Popen[bytes]],
    amqp_url: str,
    tmp_path: Path,
) -> None:
    project = tenant.project_id
    for queue in ("echo", "slow_first"):
        delete_queues(submit_queue(project, queue))
        delete_queues(results_queue(project, queue))
    delete_queues(work_queue(project, DEPLOYMENT))
    await register(project, DEPLOYMENT, ["echo", "slow_first"])
    client = await make_gateway()
    dispatcher_log = tmp_path / "dispatcher.log"
    processes.append(
        dispatcher_process(
            amqp_url, project, dispatcher_log, POLOS_DISPATCHER_LEASE_SECONDS=str(LEASE)
        )
    )
    workers = {}
    for name in ("w1", "w2"):
        worker = worker_process(amqp_url, project, DEPLOYMENT, tmp_path / f"{name}.log")
        workers[worker.pid] = worker
        processes.append(worker)
    await wait_for_log(dispatcher_log, "dispatcher ready")

    response = await client.post(
        "/api/v1/workflows/echo/run",
        json={"payload": {"hello": "world"}, "queue_concurrency_limit": 2},
        headers=tenant.headers,
    )
    assert response.status == 200, await response.text()
    execution_id = (await response.json())["execution_id"]
    completed = await event_log.wait_status(execution_id, S.COMPLETED, timeout=20)
    assert completed.result == {"hello": "world"}
    # The gateway's queued event travels on another connection: its place among
    # the dispatcher's events is not fixed.
    assert S.QUEUED in event_log.statuses(execution_id)
    # A short run is never reported running; its result says when it started.
    assert dispatched(event_log, execution_id) == [S.ADMITTED, S.COMPLETED]
    assert completed.started_at is not None
    assert event_log.first(execution_id, S.ADMITTED).submission is not None

    # A worker killed mid-run: once its lease expired the execution is
    # dispatched again, to the other worker, and completes; the dispatcher
    # keeps its slot all along.
    response = await client.post(
        "/api/v1/workflows/slow_first/run", json={"payload": None}, headers=tenant.headers
    )
    execution_id = (await response.json())["execution_id"]
    running = await event_log.wait_status(execution_id, S.RUNNING, timeout=20)
    assert running.worker_id is not None
    victim = workers[_pid_of(running.worker_id)]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    completed = await event_log.wait_status(execution_id, S.COMPLETED, timeout=20)
    assert completed.result["redelivered"] is True
    assert _pid_of(completed.worker_id or "") != victim.pid
    statuses = dispatched(event_log, execution_id)
    assert statuses == [S.ADMITTED, S.RUNNING, S.ADMITTED, S.COMPLETED]  # the 2nd is short
    # Not before its lease ended (from its last heartbeat, shortly before the kill).
    second = [e for e in event_log.of(execution_id) if e.status is S.ADMITTED][1]
    assert second.dispatch_id != running.dispatch_id
    assert event_log.arrival(execution_id, S.COMPLETED) - killed_at >= LEASE * 2 / 3 - 0.5


async def test_burst_dispatcher_exits_once_its_queues_are_empty(
    queue_kit: QueueKit,
    event_log: EventLog,
    processes: list[subprocess.Popen[bytes]],
    start_probe: ProbeFactory,
    amqp: AbstractConnection,
    amqp_url: str,
    uid: str,
    tmp_path: Path,
) -> None:
    await queue_kit.declare("q", limit=2)
    ids = [await queue_kit.submit("q", {"seconds": 0.05}) for _ in range(6)]
    probe = await start_probe()
    process = dispatcher_process(amqp_url, uid, tmp_path / "burst.log", "--burst")
    processes.append(process)
    assert await asyncio.to_thread(process.wait, 20) == 0
    ends = await event_log.wait_terminal(ids, timeout=5)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert await queue_depth(amqp, submit_queue(uid, "q")) == 0
    assert sorted(probe.runs) == sorted(ids)
