"""The worker takes its work deliveries without a task each, and still after a reconnect.

aio-pika runs a queue consumer's callback in a task per delivery (aiormq's, then
its own); the worker's work consumer is called in the channel reader's step
(``broker.delivery``) through aio-pika's robust queue, which consumes again with
the same callback when the connection comes back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas.dispatch import Completed
from tests.proxy import TcpProxy
from tests.worker_harness import FakeDispatcher, StartWorker, proxied
from worker import ExecutionContext, WorkerSettings
from worker._delivery import Delivery
from worker._executions import Executions


@pytest.fixture
def starting_tasks(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.Task[Any] | None]:
    """The task each execution was started in (a delivery's, or the reader's)."""
    tasks: list[asyncio.Task[Any] | None] = []
    begin = Executions.begin

    def recording(self: Executions, delivery: Delivery) -> None:
        tasks.append(asyncio.current_task())
        begin(self, delivery)

    monkeypatch.setattr(Executions, "begin", recording)
    return tasks


async def _completed(dispatcher: FakeDispatcher, ids: list[str]) -> None:
    for execution_id in ids:
        completed = await dispatcher.wait_for(execution_id, "completed", timeout=20)
        assert isinstance(completed, Completed)


async def test_work_deliveries_are_taken_without_a_task_each(
    dispatcher: FakeDispatcher,
    start_worker: StartWorker,
    starting_tasks: list[asyncio.Task[Any] | None],
) -> None:
    # All queued before the worker consumes: 200 deliveries in a few reads, each
    # started at once (a slot for every one), none from a slot freed later.
    ids = [await dispatcher.dispatch("echo", n) for n in range(200)]
    await start_worker(concurrency=200)
    await _completed(dispatcher, ids)
    assert len(starting_tasks) == 200
    # aio-pika's way: a task per delivery, 200. Here: the channel's reader.
    assert len(set(starting_tasks)) == 1


async def test_deliveries_are_still_taken_without_a_task_each_after_a_reconnect(
    dispatcher: FakeDispatcher,
    start_worker: StartWorker,
    starting_tasks: list[asyncio.Task[Any] | None],
    broker_proxy: TcpProxy,
    amqp_url: str,
) -> None:
    async def quick(ctx: ExecutionContext, payload: Any) -> Any:
        return payload

    worker = await start_worker(
        {"quick": quick},
        url=proxied(broker_proxy, amqp_url),
        concurrency=100,
        settings=WorkerSettings(confirm_timeout_seconds=0.5),
    )
    await _completed(dispatcher, [await dispatcher.dispatch("quick", 0)])
    broker_proxy.cut()
    await asyncio.sleep(0.5)
    ids = [await dispatcher.dispatch("quick", n) for n in range(100)]
    starting_tasks.clear()
    broker_proxy.restore()
    await _completed(dispatcher, ids)
    # The robust queue consumed again on the new channel, with the same callback:
    # taken in its reader's step, not one task per delivery.
    assert len(starting_tasks) == 100
    assert len(set(starting_tasks)) == 1
    await worker.stop()
