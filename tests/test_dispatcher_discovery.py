"""Discovery with a registry full of queues that no longer exist: the dispatcher
starts quickly, creates nothing for them, keeps its connection, and serves the
live queues, including one of the dead ones declared again later."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractConnection

from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryWriter, declare_registry
from schemas.dispatch import ExecutionStatus
from schemas.ids import now_rfc3339
from schemas.registry import QueueDeclared
from schemas.topology import results_queue
from tests.conftest import DispatcherFactory, queue_exists
from tests.dispatcher_support import EventLog, Probe, QueueKit, probe_worker

S = ExecutionStatus
DEAD = 300


@pytest.fixture
async def probe(amqp_url: str, uid: str) -> AsyncIterator[Probe]:
    probe = Probe()
    worker = probe_worker(amqp_url, uid, probe)
    await worker.start()
    yield probe
    await worker.stop(drain_timeout=0)


@pytest.fixture
async def dead_queues(amqp: AbstractConnection, uid: str) -> AsyncIterator[list[str]]:
    """``DEAD`` queue_declared events of the test's project for queues never declared."""
    names = [f"gone{n}" for n in range(DEAD)]
    async with amqp.channel() as channel:
        await declare_registry(channel)
    publisher = ConfirmedPublisher(amqp, confirm_timeout=10.0, channels=1)
    await publisher.start()
    writer = RegistryWriter(publisher)
    await asyncio.gather(
        *(
            writer.append(QueueDeclared(at=now_rfc3339(), project_id=uid, queue_name=name))
            for name in names
        )
    )
    await publisher.close()
    yield names
    # A dispatcher that declared results queues for them would leave hundreds of
    # quorum queues behind; every one costs the broker file handles.
    channel = await amqp.channel()
    for name in names:
        await channel.queue_delete(results_queue(uid, name))
    await channel.close()


async def test_dead_registry_entries_cost_one_probe_each_and_create_nothing(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    dead_queues: list[str],
    amqp: AbstractConnection,
) -> None:
    await queue_kit.declare("live")
    started = time.monotonic()
    dispatcher = await make_dispatcher()
    took = time.monotonic() - started
    session = dispatcher.session
    assert session is not None
    assert session.probe is not None

    assert set(session.owners) == {(queue_kit.project, "live")}
    assert len(session.missing) == DEAD
    assert session.probe.not_found == DEAD  # one failed passive declare each
    # The registry replay and the probes; generous for a loaded 2-core machine.
    assert took < 10, f"ready after {took:.1f}s"

    execution = await queue_kit.submit("live", {"seconds": 0})
    ends = await event_log.wait_terminal([execution])
    assert ends[execution].status is S.COMPLETED

    for name in dead_queues:
        assert not await queue_exists(amqp, results_queue(queue_kit.project, name)), name
    assert dispatcher.sessions == 1
    assert not session.broken.is_set()


async def test_a_dead_queue_declared_again_is_owned(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    dead_queues: list[str],
) -> None:
    dispatcher = await make_dispatcher()
    session = dispatcher.session
    assert session is not None
    assert not session.owners

    revived = dead_queues[7]
    await queue_kit.declare(revived)
    execution = await queue_kit.submit(revived, {"seconds": 0})
    ends = await event_log.wait_terminal([execution])

    assert ends[execution].status is S.COMPLETED
    assert set(session.owners) == {(queue_kit.project, revived)}
    assert dispatcher.sessions == 1
