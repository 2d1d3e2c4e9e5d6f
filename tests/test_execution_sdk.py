"""The real ``polos-sdk`` client against the whole system: invoke, poll ``handle.get()``
to the worker's result, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from schemas.dispatch import ExecutionStatus
from tests.dispatcher_support import until
from tests.execution_support import System, running_system, sdk_client

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(amqp_url, tmp_path_factory.mktemp("sdk")) as running:
        yield running


async def poll(handle: Any, client: Any, *statuses: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            state: dict[str, Any] = await handle.get(client)
            if state["status"] in statuses:
                return state
            await asyncio.sleep(0.02)


async def test_invoke_then_get_polls_to_the_workers_result(system: System) -> None:
    client = sdk_client(system)
    system.queues.add("echo")

    handle = await client.invoke("echo", payload={"name": "world"}, user_id="u1")
    # Right after the 200: the record is there (no 404 for the SDK to raise).
    first = await handle.get(client)
    assert first["status"] in ("queued", "admitted", "running", "completed")

    state = await poll(handle, client, "completed")
    assert state["result"]["echo"] == {"name": "world"}
    assert state["error"] is None
    assert state["created_at"] == handle.created_at
    assert state["completed_at"]
    details = await client.get_execution(handle.id)
    assert details["id"] == handle.id
    assert details["user_id"] == "u1"


async def test_cancel_a_running_execution_with_the_sdk(system: System) -> None:
    client = sdk_client(system)
    system.queues.add("sleep")
    handle = await client.invoke("sleep", payload={"seconds": 30})
    await system.events.wait_status(handle.id, ExecutionStatus.RUNNING)

    assert await handle.cancel(client) is True

    state = await handle.get(client)
    assert state["status"] == "cancelled"
    await until(lambda: handle.id in system.probe.cancelled, what="the worker to stop it")
    # Over: a second cancel is refused (409), which the SDK reports as False.
    assert await client.cancel_execution(handle.id) is False


async def test_cancel_of_an_unknown_execution_is_false(system: System) -> None:
    client = sdk_client(system)
    assert await client.cancel_execution("0190b6c5-2b1a-7c3d-8e4f-0123456789ab") is False
