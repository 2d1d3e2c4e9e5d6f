"""Admission: an execution runs once, in order, and never beside more than its limit allows."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection

from schemas.dispatch import ExecutionStatus
from schemas.topology import results_queue, submit_queue
from tests.conftest import DispatcherFactory, ProbeFactory, queue_depth
from tests.dispatcher_support import EventLog, QueueKit, in_flight_per_ledger

S = ExecutionStatus


async def test_submission_runs_once_and_completes_with_its_result(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
    amqp: AbstractConnection,
) -> None:
    await queue_kit.declare("q")
    probe = await start_probe()
    dispatcher = await make_dispatcher()

    execution_id = await queue_kit.submit("q", {"seconds": 0.05}, key="k1")

    completed = await event_log.wait_status(execution_id, S.COMPLETED)
    assert completed.result == {"slept": 0.05}
    assert completed.worker_id
    assert event_log.statuses(execution_id) == [S.ADMITTED, S.RUNNING, S.COMPLETED]
    admitted = event_log.first(execution_id, S.ADMITTED)
    assert admitted.submission is not None
    assert admitted.submission.execution_id == execution_id
    assert admitted.concurrency_key == "k1"
    assert admitted.dispatch_id == completed.dispatch_id
    assert probe.runs == [execution_id]
    # Acknowledged once terminal: once the dispatcher is gone (which would hand
    # back anything unacknowledged), nothing is left in either queue.
    await dispatcher.stop()
    assert await queue_depth(amqp, submit_queue(queue_kit.project, "q")) == 0
    # The results queue keeps only the ledger, and it has nothing in flight.
    assert await in_flight_per_ledger(amqp, results_queue(queue_kit.project, "q")) == set()


async def test_limit_is_reached_and_never_exceeded(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
) -> None:
    await queue_kit.declare("q", limit=3)
    probe = await start_probe(concurrency=20)
    await make_dispatcher()

    ids = [await queue_kit.submit("q", {"seconds": 0.2}) for _ in range(15)]

    ends = await event_log.wait_terminal(ids)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert probe.max_running == 3
    assert sorted(probe.runs) == sorted(ids)
    # FIFO: each starts among the limit of executions around its place in the queue
    # (the ones admitted together race to the worker).
    assert max(abs(probe.runs.index(e) - i) for i, e in enumerate(ids)) < 3


async def test_raised_and_lowered_limits_take_effect_at_once(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
) -> None:
    await queue_kit.declare("q", limit=1)
    probe = await start_probe(concurrency=20)
    await make_dispatcher()
    ids = [await queue_kit.submit("q", {"seconds": 0.4}) for _ in range(12)]
    await event_log.wait_status(ids[0], S.RUNNING)
    assert probe.max_running == 1

    await queue_kit.set_limit("q", 4)
    await event_log.wait_for(lambda: len(probe.running) == 4, what="4 running at once")

    await queue_kit.set_limit("q", 2)
    await event_log.wait_for(lambda: len(probe.running) <= 2, timeout=5, what="at most 2")
    probe.max_running = len(probe.running)
    ends = await event_log.wait_terminal(ids)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert probe.max_running == 2


async def test_limit_beyond_the_window_renews_the_consumer_and_is_reached(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
) -> None:
    # Limit 2 gives a window of 32 deliveries; 40 can only run at once once
    # the (idle) queue is consumed again with a larger window.
    await queue_kit.declare("q", limit=2)
    probe = await start_probe(concurrency=64)
    await make_dispatcher()
    await queue_kit.set_limit("q", 40)
    await asyncio.sleep(0.3)

    ids = [await queue_kit.submit("q", {"seconds": 1.0}) for _ in range(45)]

    ends = await event_log.wait_terminal(ids)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert probe.max_running == 40
