"""Many queues on one dispatcher: consumers share a few channels, each keeps its own
window and limit; memory follows the window, never the backlog."""

from __future__ import annotations

import pytest
from aio_pika.abc import AbstractConnection

from schemas.dispatch import ExecutionStatus
from schemas.topology import submit_queue
from tests.conftest import DispatcherFactory, ProbeFactory, queue_depth
from tests.dispatcher_support import EventLog, Probe, QueueKit, until

S = ExecutionStatus


@pytest.fixture
async def probe(start_probe: ProbeFactory) -> Probe:
    return await start_probe(concurrency=64)


async def test_each_of_many_queues_sharing_channels_keeps_its_own_limit(
    queue_kit: QueueKit, event_log: EventLog, make_dispatcher: DispatcherFactory, probe: Probe
) -> None:
    limits = {f"q{n}": 1 + n % 3 for n in range(12)}
    for queue, limit in limits.items():
        await queue_kit.declare(queue, limit=limit)
    # 12 submission consumers (and their results consumers) on channels of 5.
    dispatcher = await make_dispatcher(dispatcher_consumers_per_channel=5)

    # Long enough that the submissions of a queue, sent one by one, overlap when run.
    ids = [await queue_kit.submit(queue, {"seconds": 1.0}) for _ in range(4) for queue in limits]
    ends = await event_log.wait_terminal(ids, timeout=30)

    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert probe.max_running_in == limits
    session = dispatcher.session
    assert session is not None
    assert 5 <= session.consumer_channels <= 6


async def test_the_dispatcher_holds_a_window_of_the_backlog_not_the_backlog(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    amqp: AbstractConnection,
) -> None:
    await queue_kit.declare("q", limit=1)  # window: 32 deliveries
    first = await queue_kit.submit("q", {"seconds": 30})
    for _ in range(99):
        await queue_kit.submit("q", {"seconds": 0})
    dispatcher = await make_dispatcher()
    await event_log.wait_status(first, S.RUNNING)

    session = dispatcher.session
    assert session is not None
    owner = next(iter(session.owners.values()))
    await until(lambda: owner.lifecycle.pending == 31, what="a full window")
    assert owner.held == 1
    assert await queue_depth(amqp, submit_queue(queue_kit.project, "q")) == 68
