"""Leases on the worker (DESIGN §3): heartbeats, early acknowledgement, stopping stale copies.

The dispatcher's part is played by ``FakeDispatcher``; leases are sub-second
so that renewals and expiries happen within a test.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from schemas.dispatch import Cancelled, Completed, Heartbeat
from tests.conftest import has_depth, queue_depth
from tests.proxy import TcpProxy
from tests.worker_harness import FakeDispatcher, StartWorker, proxied, until
from worker import ExecutionContext, Worker, WorkerSettings

LEASE = 1.5  # renewed every 0.5 s; the worker's own lease ends 1 s after a confirmed send
DELAY = 0.05


class Gate:
    """A workflow that runs until released, recording starts, stops and the peak."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.stopped: dict[str, float] = {}
        self.now = 0
        self.peak = 0

    async def __call__(self, ctx: ExecutionContext, payload: Any) -> Any:
        self.started.append(ctx.dispatch_id)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if not (payload or {}).get("short"):
                await self.release.wait()
            return {"redelivered": ctx.redelivered}
        except asyncio.CancelledError:
            self.stopped[ctx.dispatch_id] = time.monotonic()
            raise
        finally:
            self.now -= 1


MakeWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def make_worker(start_worker: StartWorker) -> MakeWorker:
    async def _make(gate: Gate, *, url: str | None = None, **settings: Any) -> Worker:
        async def gated(ctx: ExecutionContext, payload: Any) -> Any:
            return await gate(ctx, payload)

        fields: dict[str, Any] = {
            "confirm_timeout_seconds": 0.5,
            "worker_running_delay_seconds": DELAY,
            **settings,
        }
        return await start_worker({"gated": gated}, url=url, settings=WorkerSettings(**fields))

    return _make


async def test_long_run_is_reported_at_the_running_delay_and_renewed_every_third_of_its_lease(
    dispatcher: FakeDispatcher, make_worker: MakeWorker
) -> None:
    gate = Gate()
    worker = await make_worker(gate)
    sent = time.monotonic()
    execution_id = await dispatcher.dispatch("gated", dispatch_id="d-1", lease_seconds=LEASE)

    first = await dispatcher.wait_for_heartbeat(execution_id)
    await dispatcher.wait_for_heartbeat(execution_id, count=4)
    arrivals = [at for at, _ in dispatcher.heartbeats_of(execution_id)]
    gate.release.set()
    completed = await dispatcher.wait_for(execution_id, "completed")

    assert first.worker_id == worker.worker_id
    [entry] = first.executions
    assert (entry.execution_id, entry.dispatch_id) == (execution_id, "d-1")
    assert arrivals[0] - sent < DELAY + 0.3
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(LEASE / 3 - 0.15 < gap < LEASE / 3 + 0.25 for gap in gaps), gaps
    assert isinstance(completed, Completed)
    assert completed.started_at == entry.started_at
    # Once its result is in, no heartbeat carries it any more.
    count = len(dispatcher.heartbeats_of(execution_id))
    await asyncio.sleep(LEASE / 3 + 0.2)
    assert len(dispatcher.heartbeats_of(execution_id)) == count
    assert [r.type for r in dispatcher.results_of(execution_id)] == ["completed"]


async def test_one_heartbeat_carries_every_run_of_its_results_queue(
    dispatcher: FakeDispatcher, make_worker: MakeWorker
) -> None:
    gate = Gate()
    await make_worker(gate)
    ids = [await dispatcher.dispatch("gated", lease_seconds=LEASE) for _ in range(3)]
    for execution_id in ids:
        await dispatcher.wait_for_heartbeat(execution_id)
    count = len(dispatcher.results)

    await until(_returns(lambda: len(dispatcher.results) >= count + 2), timeout=3)

    renewals = dispatcher.results[count:]
    for renewal in renewals:
        assert renewal.type == "heartbeat"
        assert sorted(e.execution_id for e in renewal.executions) == sorted(ids)
    gate.release.set()


async def test_long_run_delivery_is_acknowledged_once_its_heartbeat_is_confirmed(
    dispatcher: FakeDispatcher,
    make_worker: MakeWorker,
    broker_proxy: TcpProxy,
    amqp_url: str,
    amqp: AbstractConnection,
) -> None:
    gate = Gate()
    await make_worker(gate, url=proxied(broker_proxy, amqp_url))
    execution_id = await dispatcher.dispatch("gated", lease_seconds=LEASE)
    await dispatcher.wait_for_heartbeat(execution_id)
    await asyncio.sleep(0.2)  # the confirm reaches the worker, its ack the broker

    broker_proxy.cut()
    await asyncio.sleep(0.5)

    # An unacknowledged delivery would be back in the queue with the connection.
    assert await queue_depth(amqp, dispatcher.work_queue) == 0
    gate.release.set()


async def test_worker_cut_off_from_the_broker_stops_its_leased_copy_before_the_lease_ends(
    dispatcher: FakeDispatcher,
    make_worker: MakeWorker,
    broker_proxy: TcpProxy,
    amqp_url: str,
    amqp: AbstractConnection,
) -> None:
    gate = Gate()
    worker = await make_worker(gate, url=proxied(broker_proxy, amqp_url))
    execution_id = await dispatcher.dispatch("gated", dispatch_id="d-1", lease_seconds=LEASE)
    await dispatcher.wait_for_heartbeat(execution_id, count=2)

    broker_proxy.cut()
    cut = time.monotonic()
    await until(_returns(lambda: "d-1" in gate.stopped), timeout=LEASE + 1)

    last_heartbeat = dispatcher.heartbeats_of(execution_id)[-1][0]
    stopped = gate.stopped["d-1"]
    # It outlived the link (the lease, not the delivery, protected it)...
    assert stopped - cut > 0.2
    # ...and stopped before the owner's lease (receipt + lease_seconds) ended.
    assert stopped < last_heartbeat + LEASE
    broker_proxy.restore()
    await until(_returns(lambda: worker.running == frozenset()), timeout=5)
    await asyncio.sleep(0.5)
    # Nothing but (best effort) a release; the work is not back in the queue.
    assert {r.type for r in dispatcher.results_of(execution_id)} <= {"released"}
    assert await queue_depth(amqp, dispatcher.work_queue) == 0
    assert gate.started == ["d-1"]


async def test_unacknowledged_copy_stops_at_once_when_its_channel_dies(
    dispatcher: FakeDispatcher,
    make_worker: MakeWorker,
    broker_proxy: TcpProxy,
    amqp_url: str,
) -> None:
    gate = Gate()
    # Never reported running: only its delivery protects it.
    await make_worker(gate, url=proxied(broker_proxy, amqp_url), worker_running_delay_seconds=30.0)
    execution_id = await dispatcher.dispatch("gated", dispatch_id="d-1")
    await until(_returns(lambda: gate.started == ["d-1"]))

    broker_proxy.cut()
    cut = time.monotonic()
    await until(_returns(lambda: "d-1" in gate.stopped), timeout=3)
    assert gate.stopped["d-1"] - cut < 0.5

    # The broker requeued it; the redelivery runs (here again) and reports once.
    broker_proxy.restore()
    await until(_returns(lambda: len(gate.started) == 2), timeout=10)
    gate.release.set()
    completed = await dispatcher.wait_for(execution_id, "completed")
    assert isinstance(completed, Completed)
    assert completed.result == {"redelivered": True}
    assert [r.type for r in dispatcher.results_of(execution_id)] == ["completed"]


async def test_concurrency_holds_while_long_runs_are_acknowledged_and_extras_go_back(
    dispatcher: FakeDispatcher, make_worker: MakeWorker, amqp: AbstractConnection
) -> None:
    hold = 1.0
    gate = Gate()
    busy = await make_worker(gate, worker_concurrency=2, worker_hold_seconds=hold)
    long_ids = [await dispatcher.dispatch("gated", lease_seconds=LEASE) for _ in range(2)]
    for execution_id in long_ids:
        await dispatcher.wait_for_heartbeat(execution_id)

    # Both long runs are acknowledged: the broker may deliver two more to this
    # worker, which has no slot for them.
    sent = time.monotonic()
    short_ids = [await dispatcher.dispatch("gated", {"short": True}) for _ in range(3)]
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 3), timeout=hold + 1)
    assert time.monotonic() - sent <= hold
    await asyncio.sleep(0.3)
    assert await queue_depth(amqp, dispatcher.work_queue) == 3  # not taken again
    assert len(gate.started) == 2

    # Handed back, another worker runs them while the long runs go on.
    other_gate = Gate()
    other = await make_worker(other_gate, worker_concurrency=3)
    results = [await dispatcher.wait_for(execution_id, "completed") for execution_id in short_ids]
    assert all(isinstance(r, Completed) and r.worker_id == other.worker_id for r in results)
    assert sorted(r.result["redelivered"] for r in results if isinstance(r, Completed)) == [
        False,
        True,
        True,
    ]
    assert busy.running == frozenset(long_ids)
    gate.release.set()
    for execution_id in long_ids:
        completed = await dispatcher.wait_for(execution_id, "completed")
        assert isinstance(completed, Completed)
        assert completed.worker_id == busy.worker_id
    assert gate.peak == 2


@pytest.mark.parametrize(("reason", "reported"), [("superseded", []), ("user", ["cancelled"])])
async def test_dispatch_scoped_cancel_stops_only_that_dispatch(
    dispatcher: FakeDispatcher, make_worker: MakeWorker, reason: str, reported: list[str]
) -> None:
    gate = Gate()
    await make_worker(gate)
    execution_id, stale = dispatcher.work("gated", dispatch_id="d-1", lease_seconds=LEASE)
    _, current = dispatcher.work(
        "gated", execution_id=execution_id, dispatch_id="d-2", lease_seconds=LEASE
    )
    await dispatcher.publish(stale)
    await dispatcher.publish(current)
    await dispatcher.wait_for_heartbeat(execution_id, count=2)
    await until(_returns(lambda: sorted(gate.started) == ["d-1", "d-2"]))

    await dispatcher.cancel(execution_id, reason, dispatch_id="d-1")  # type: ignore[arg-type]

    await until(_returns(lambda: "d-1" in gate.stopped))
    count = len(dispatcher.heartbeats_of(execution_id))
    await dispatcher.wait_for_heartbeat(execution_id, count=count + 1)
    [(_, renewal)] = dispatcher.heartbeats_of(execution_id)[-1:]
    assert [e.dispatch_id for e in renewal.executions] == ["d-2"]
    gate.release.set()
    completed = await dispatcher.wait_for(execution_id, "completed")
    assert isinstance(completed, Completed)
    assert completed.dispatch_id == "d-2"
    assert "d-2" not in gate.stopped
    results = dispatcher.results_of(execution_id)
    assert (
        sorted(r.type for r in results if not isinstance(r, Heartbeat) and r.dispatch_id == "d-1")
        == reported
    )
    for result in results:
        if isinstance(result, Cancelled):
            assert (result.dispatch_id, result.reason) == ("d-1", reason)


def _returns(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check
