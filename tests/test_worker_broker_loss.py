"""Broker loss, through a TCP proxy the test cuts (the shared broker is never stopped).

A result decided while the broker is unreachable is delivered once it is back,
and the work message of a run never reported running is acknowledged only after
the broker confirmed its result.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from schemas.dispatch import Completed
from tests.conftest import has_depth, queue_depth
from tests.proxy import TcpProxy
from tests.worker_harness import FakeDispatcher, StartWorker, proxied, until
from tests.workflows import add_workflows
from worker import ExecutionContext, Worker, WorkerSettings


class Gated:
    """A workflow that runs until the test releases it, counting its runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def __call__(self, ctx: ExecutionContext, payload: Any) -> Any:
        self.calls += 1
        await self.release.wait()
        self.finished.set()
        return "done"


@pytest.fixture(params=[0.05], ids=["reported"])
def running_delay(request: pytest.FixtureRequest) -> float:
    return float(request.param)


async def start_gated(
    start_worker: StartWorker, amqp_url: str, broker_proxy: TcpProxy, settings: WorkerSettings
) -> tuple[Worker, Gated]:
    """A worker behind the proxy whose ``gated`` workflow runs until released."""
    gated = Gated()

    async def gate(ctx: ExecutionContext, payload: Any) -> Any:
        return await gated(ctx, payload)

    worker = await start_worker(
        {"gated": gate}, url=proxied(broker_proxy, amqp_url), settings=settings
    )
    return worker, gated


@pytest.fixture
async def gated_worker(
    start_worker: StartWorker, amqp_url: str, broker_proxy: TcpProxy, running_delay: float
) -> tuple[Worker, Gated]:
    settings = WorkerSettings(
        confirm_timeout_seconds=0.5, worker_running_delay_seconds=running_delay
    )
    return await start_gated(start_worker, amqp_url, broker_proxy, settings)


async def test_result_decided_during_an_outage_is_delivered_when_the_broker_returns(
    dispatcher: FakeDispatcher,
    gated_worker: tuple[Worker, Gated],
    broker_proxy: TcpProxy,
    amqp: AbstractConnection,
) -> None:
    worker, gated = gated_worker
    execution_id = await dispatcher.dispatch("gated")
    await dispatcher.wait_for_heartbeat(execution_id)

    broker_proxy.cut()
    gated.release.set()
    await gated.finished.wait()
    await asyncio.sleep(0.3)  # the worker tries to publish while the broker is unreachable
    broker_proxy.restore()

    completed = await dispatcher.wait_for(execution_id, "completed", timeout=15)
    assert isinstance(completed, Completed)
    assert completed.result == "done"
    async with asyncio.timeout(10):
        await worker.wait_idle()
    await worker.stop()
    assert gated.calls == 1
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


# A run that is never reported running (it ends before the running delay) is
# protected by its unacknowledged delivery alone.
UNREPORTED = pytest.mark.parametrize("running_delay", [30.0], ids=["unreported"], indirect=True)


@UNREPORTED
async def test_unreported_work_is_acknowledged_only_after_its_result_is_confirmed(
    dispatcher: FakeDispatcher,
    gated_worker: tuple[Worker, Gated],
    broker_proxy: TcpProxy,
    amqp: AbstractConnection,
) -> None:
    worker, gated = gated_worker
    execution_id = await dispatcher.dispatch("gated")
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 0))
    await until(lambda: _true(gated.calls == 1))

    # The broker stores the result but its confirm never reaches the worker...
    broker_proxy.hold()
    gated.release.set()
    await dispatcher.wait_for(execution_id, "completed")
    # ...so the work message is still unacknowledged: losing the link returns it.
    broker_proxy.cut()
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 1))

    broker_proxy.restore()
    async with asyncio.timeout(15):
        await worker.wait_idle()
    await worker.stop()
    assert gated.calls == 1
    assert await queue_depth(amqp, dispatcher.work_queue) == 0
    assert {r.type for r in dispatcher.results_of(execution_id)} == {"completed"}


async def test_worker_started_while_the_broker_is_unreachable_starts_when_it_returns(
    dispatcher: FakeDispatcher, amqp_url: str, uid: str, broker_proxy: TcpProxy
) -> None:
    broker_proxy.cut()
    worker = add_workflows(
        Worker(
            project=uid,
            deployment="v1",
            amqp_url=broker_proxy.url(amqp_url),
            settings=WorkerSettings(worker_reconnect_interval_seconds=0.1),
        )
    )
    starting = asyncio.create_task(worker.start())
    try:
        await asyncio.sleep(0.3)  # a few failed attempts
        assert not starting.done()
        broker_proxy.restore()
        async with asyncio.timeout(10):
            await starting

        execution_id = await dispatcher.dispatch("echo", "late start")
        completed = await dispatcher.wait_for(execution_id, "completed")
        assert isinstance(completed, Completed)
        assert completed.result == "late start"
    finally:
        starting.cancel()
        await worker.stop()


@UNREPORTED
async def test_stopping_while_the_broker_is_unreachable_leaves_unreported_work_to_be_redone(
    dispatcher: FakeDispatcher,
    gated_worker: tuple[Worker, Gated],
    broker_proxy: TcpProxy,
    amqp: AbstractConnection,
    amqp_url: str,
    uid: str,
) -> None:
    worker, gated = gated_worker
    execution_id = await dispatcher.dispatch("gated")
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 0))
    await until(lambda: _true(gated.calls == 1))
    broker_proxy.cut()
    gated.release.set()
    await gated.finished.wait()

    async with asyncio.timeout(10):
        await worker.stop(drain_timeout=0.5)

    assert await queue_depth(amqp, dispatcher.work_queue) == 1
    rerun = Worker(project=uid, deployment="v1", amqp_url=amqp_url)
    released = Gated()
    released.release.set()
    rerun.add_workflow("gated", released.__call__)
    await rerun.start()
    try:
        completed = await dispatcher.wait_for(execution_id, "completed")
    finally:
        await rerun.stop(drain_timeout=0)
    assert isinstance(completed, Completed)
    assert completed.worker_id == rerun.worker_id


async def _true(value: bool) -> bool:
    return value


async def test_with_a_write_linger_work_is_still_acknowledged_only_after_its_confirm(
    dispatcher: FakeDispatcher,
    start_worker: StartWorker,
    amqp_url: str,
    broker_proxy: TcpProxy,
    amqp: AbstractConnection,
) -> None:
    # A long linger: the result and the acknowledgement of the work, which a
    # linger lets share a socket write with whatever else is written meanwhile,
    # must still be written in turn, the acknowledgement after the confirm.
    worker, gated = await start_gated(
        start_worker,
        amqp_url,
        broker_proxy,
        WorkerSettings(
            confirm_timeout_seconds=2.0,
            worker_running_delay_seconds=30.0,
            worker_write_linger_seconds=0.1,
        ),
    )
    execution_id = await dispatcher.dispatch("gated")
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 0))
    await until(lambda: _true(gated.calls == 1))

    broker_proxy.hold()
    released = time.monotonic()
    gated.release.set()
    await dispatcher.wait_for(execution_id, "completed")
    assert dispatcher.received[-1] - released >= 0.09  # the result lingered
    await asyncio.sleep(0.3)  # three lingers: an acknowledgement would be out by now
    broker_proxy.cut()
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 1))

    broker_proxy.restore()
    async with asyncio.timeout(15):
        await worker.wait_idle()
    await worker.stop()
    assert gated.calls == 1
    assert await queue_depth(amqp, dispatcher.work_queue) == 0
