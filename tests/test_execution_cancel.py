"""``POST /api/v1/executions/{id}/cancel``: a running execution is stopped on its worker
and frees its slot, a queued one never runs, a terminal one is 409."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from gateway.auth import digest_key, key_id_for
from schemas.dispatch import ExecutionStatus
from tests.conftest import assert_error, detail_fields
from tests.dispatcher_support import until
from tests.execution_support import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="module")

S = ExecutionStatus
LONG = {"seconds": 30}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(
        amqp_url, tmp_path_factory.mktemp("cancel"), gateway={"cancel_wait_seconds": 1.0}
    ) as running:
        yield running


def key_id(system: System) -> str:
    return key_id_for(digest_key(system.tenant.api_key))


async def cancel(system: System, execution_id: str) -> tuple[int, dict[str, Any]]:
    response = await system.client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=system.headers
    )
    body: dict[str, Any] = await response.json()
    return response.status, body


async def test_a_running_execution_is_cancelled_on_its_worker_and_frees_its_slot(
    system: System,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    running = await system.submit(
        "sleep", payload=LONG, queue_name=queue, queue_concurrency_limit=1
    )
    await system.events.wait_status(running, S.RUNNING)
    behind = await system.submit("sleep", payload={"seconds": 0.01}, queue_name=queue)

    status, body = await cancel(system, running)

    assert status == 200, body
    assert body["execution_id"] == running
    assert body["status"] == "cancelled"
    assert body["cancelled_at"]
    record = await system.get(running)
    assert record["status"] == "cancelled"
    assert record["cancelled_by"] == key_id(system)
    assert record["cancelled_at"] == body["cancelled_at"]
    assert record["error"].startswith("cancelled:")
    await until(lambda: running in system.probe.cancelled, what="the worker to stop it")
    # Its slot (limit 1) went to the next one.
    await system.wait_status(behind, "completed")


async def test_a_queued_execution_ends_cancelled_and_never_runs(system: System) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    holder = await system.submit("sleep", payload=LONG, queue_name=queue, queue_concurrency_limit=1)
    await system.events.wait_status(holder, S.RUNNING)
    waiting = await system.submit("sleep", payload={"seconds": 0.01}, queue_name=queue)
    await system.wait_status(waiting, "queued")

    status, body = await cancel(system, waiting)

    assert (status, body["status"]) == (200, "cancelled")
    record = await system.get(waiting)
    assert record["cancelled_by"] == key_id(system)
    assert record["started_at"] is None
    assert (await cancel(system, holder))[0] == 200
    assert waiting not in system.probe.runs


async def test_one_still_in_the_broker_is_cancelled_when_it_reaches_the_head(
    system: System,
) -> None:
    # Limit 1: the dispatcher holds a window of 32 submissions; the 40th waits in
    # the broker, where the dispatcher cannot see it when the cancel comes.
    queue = f"q-{uuid.uuid4().hex[:6]}"
    holder = await system.submit("sleep", payload=LONG, queue_name=queue, queue_concurrency_limit=1)
    await system.events.wait_status(holder, S.RUNNING)
    fillers = [
        await system.submit("sleep", payload={"seconds": 0.001}, queue_name=queue)
        for _ in range(38)
    ]
    target = await system.submit("sleep", payload={"seconds": 0.001}, queue_name=queue)
    await system.wait_status(target, "queued")

    status, body = await cancel(system, target)

    assert status == 202, body  # asked for; it happens when its turn comes
    assert body == {"execution_id": target, "status": "queued", "cancelled_at": None}
    await cancel(system, holder)
    await system.events.wait_terminal([*fillers, target])
    record = await system.wait_status(target, "cancelled")
    assert record["cancelled_by"] == key_id(system)
    assert record["started_at"] is None
    assert target not in system.probe.runs
    assert all(f in system.probe.runs for f in fillers)


async def test_a_terminal_execution_is_409_with_its_status(system: System) -> None:
    execution_id = await system.submit("echo", payload=1)
    await system.wait_status(execution_id, "completed")

    response = await system.client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=system.headers
    )

    body = await assert_error(response, 409, "EXECUTION_TERMINAL")
    assert body["details"] == [{"field": "status", "message": "completed"}]
    assert (await system.get(execution_id))["status"] == "completed"


async def test_cancel_errors(system: System) -> None:
    client = system.client
    await assert_error(
        await client.post(f"/api/v1/executions/{uuid.uuid4()}/cancel", headers=system.headers),
        404,
        "EXECUTION_NOT_FOUND",
    )
    body = await assert_error(
        await client.post("/api/v1/executions/nope/cancel", headers=system.headers), 400
    )
    assert detail_fields(body) == ["execution_id"]
    await assert_error(await client.post(f"/api/v1/executions/{uuid.uuid4()}/cancel"), 401)
    await assert_error(await client.get(f"/api/v1/executions/{uuid.uuid4()}/cancel"), 405)


async def test_a_cancel_waits_for_a_dispatcher_that_is_not_there_yet(system: System) -> None:
    # Nobody owns the queue (no dispatcher runs): the request waits in the queue's
    # inbox, and the dispatcher that comes ends the execution cancelled.
    for dispatcher in system.dispatchers:
        await dispatcher.stop(drain=False)
    system.dispatchers.clear()
    queue = f"q-{uuid.uuid4().hex[:6]}"
    execution_id = await system.submit("sleep", payload=LONG, queue_name=queue)

    status, body = await cancel(system, execution_id)
    assert (status, body["status"]) == (202, "queued")

    await system.start_dispatcher()
    record = await system.wait_status(execution_id, "cancelled")
    assert record["cancelled_by"] == key_id(system)
