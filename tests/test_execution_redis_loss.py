"""Redis away: submissions and dispatch go on, status reads answer 503, and once Redis is
back every record is there (the events waited in the recorder's queue); a live event
stream open meanwhile reads the record again and ends with the result."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from schemas.dispatch import ExecutionStatus
from tests.conftest import assert_error
from tests.execution_support import System, running_system
from tests.redis_proxy import RedisProxy, redis_proxy
from tests.store_support import redis_host_port

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxy() -> AsyncIterator[RedisProxy]:
    async with redis_proxy(*redis_host_port()) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory, proxy: RedisProxy
) -> AsyncIterator[System]:
    async with running_system(
        amqp_url, tmp_path_factory.mktemp("redis-loss"), redis=proxy.url
    ) as running:
        yield running


async def test_redis_down_mid_run_loses_no_record_and_fails_no_submission(
    system: System, proxy: RedisProxy
) -> None:
    before = [await system.submit("echo", payload={"before": n}) for n in range(5)]
    for execution_id in before:
        await system.wait_status(execution_id, "completed")

    proxy.cut()
    path = f"/api/v1/executions/{before[0]}"
    error = await assert_error(
        await system.client.get(path, headers=system.headers), 503, "STORE_UNAVAILABLE"
    )
    assert error["error"]
    response = await system.client.get(path, headers=system.headers)
    assert response.headers["Retry-After"] == "1"
    for other in (
        system.client.get("/api/v1/workflows/echo/runs", headers=system.headers),
        system.client.post(f"{path}/cancel", headers=system.headers),
        system.client.get(f"{path}/events", headers=system.headers),
    ):
        await assert_error(await other, 503, "STORE_UNAVAILABLE")

    # Submissions never touch Redis: every one is accepted, and runs.
    during = await asyncio.gather(
        *(system.submit("echo", payload={"during": n}) for n in range(20))
    )
    await system.events.wait_terminal(list(during))
    batch = await system.client.post(
        "/api/v1/workflows/batch_run",
        json={"workflows": [{"workflow_id": "echo", "payload": n} for n in range(3)]},
        headers=system.headers,
    )
    assert batch.status == 200
    batched = [e["execution_id"] for e in (await batch.json())["executions"]]

    proxy.restore()
    for execution_id in [*before, *during, *batched]:
        record = await system.wait_status(execution_id, "completed")
        assert record["result"]["echo"] is not None
    runs = await system.client.get(
        "/api/v1/workflows/echo/runs", params={"limit": "100"}, headers=system.headers
    )
    listed = {e["id"] for e in (await runs.json())["executions"]}
    assert {*before, *during, *batched} <= listed


async def test_an_unknown_id_is_still_404_when_redis_is_back(system: System) -> None:
    response = await system.client.get(f"/api/v1/executions/{uuid.uuid4()}", headers=system.headers)
    await assert_error(response, 404)


async def test_a_stream_open_while_redis_drops_resyncs_and_ends_with_the_result(
    system: System, proxy: RedisProxy
) -> None:
    execution_id = await system.submit("sleep", payload={"seconds": 1.5})
    await system.events.wait_status(execution_id, ExecutionStatus.RUNNING)
    response = await system.client.get(
        f"/api/v1/executions/{execution_id}/events", headers=system.headers
    )
    assert response.status == 200
    lines: list[str] = []

    async def read() -> None:
        async for raw in response.content:
            lines.append(raw.decode().rstrip("\n"))

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(5):
            while not any(line.startswith("event: record") for line in lines):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        proxy.cut()  # the stream's subscription goes with it; the run ends meanwhile
        await asyncio.sleep(2.0)
        proxy.restore()
        async with asyncio.timeout(10):
            await reader  # the stream closes after the terminal status
    finally:
        reader.cancel()
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert data[-1]["status"] == "completed"
    # Read again after the reconnect: a second record, the completed one.
    records = [line for line in lines if line == "event: record"]
    assert len(records) == 2, lines
