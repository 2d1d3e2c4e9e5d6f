"""Discovery with a registry full of queues that no longer exist: the dispatcher
starts quickly, creates nothing for them, keeps its connection, and serves the
live queues, including a dead one declared again later (by a new
``queue_declared``, or by the gateway after a deletion)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aio_pika.abc import AbstractConnection

from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryWriter, declare_registry
from schemas.dispatch import ExecutionStatus
from schemas.ids import now_rfc3339
from schemas.registry import QueueDeclared
from schemas.topology import results_queue, submit_queue, work_queue
from tests.conftest import DispatcherFactory, GatewayFactory, ProbeFactory, Tenant, queue_exists
from tests.dispatcher_support import DEPLOYMENT, EventLog, Probe, QueueKit, until

S = ExecutionStatus
DEAD = 300


@pytest.fixture
async def probe(start_probe: ProbeFactory) -> Probe:
    return await start_probe()


@pytest.fixture
async def dead_queues(amqp: AbstractConnection, uid: str) -> AsyncIterator[list[str]]:
    """``DEAD`` queue_declared events of the test's project for queues never declared."""
    names = [f"gone{n}" for n in range(DEAD)]
    await declare_registry(amqp)
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


async def test_a_queue_the_gateway_declares_again_after_its_deletion_is_owned(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Callable[[str, str, list[str]], Awaitable[None]],
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    amqp: AbstractConnection,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    for name in (submit_queue(project, "q"), results_queue(project, "q")):
        delete_queues(name)
    delete_queues(work_queue(project, DEPLOYMENT))
    await register(project, DEPLOYMENT, ["sleep"])
    gateway = await make_gateway()
    dispatcher = await make_dispatcher()
    session = dispatcher.session
    assert session is not None

    async def submit() -> str:
        response = await gateway.post(
            "/api/v1/workflows/sleep/run",
            json={"payload": {"seconds": 0}, "queue_name": "q"},
            headers=tenant.headers,
        )
        assert response.status == 200, await response.text()
        execution_id: str = (await response.json())["execution_id"]
        return execution_id

    first = await submit()
    await event_log.wait_terminal([first])
    async with amqp.channel() as channel:
        await channel.queue_delete(submit_queue(project, "q"))
    await until(lambda: not session.owners, what="the owner letting the deleted queue go")

    second = await submit()  # the gateway declares the queue again
    ends = await event_log.wait_terminal([second])

    assert ends[second].status is S.COMPLETED
    assert set(session.owners) == {(project, "q")}
    assert dispatcher.sessions == 1


async def test_a_queue_deleted_under_its_owner_costs_the_standby_nothing(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    amqp: AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = queue_kit.project
    await queue_kit.declare("doomed")
    await queue_kit.declare("kept")
    owner = await make_dispatcher()
    standby = await make_dispatcher()
    session = standby.session
    assert session is not None
    await until(lambda: len(session.owners) == 2, what="the standby on both results queues")
    first = await queue_kit.submit("doomed", {"seconds": 0})
    await event_log.wait_terminal([first])

    # An operator deletes a queue; its owner lets it go, and later stops (a rolling
    # restart): the standby becomes the results queue's active consumer, takes
    # over, and finds no queue to consume.
    async with amqp.channel() as channel:
        await channel.queue_delete(submit_queue(project, "doomed"))
    await until(lambda: "consumer cancelled by the broker" in caplog.text, what="the owner")
    await owner.stop()
    await until(lambda: (project, "doomed") not in session.owners, timeout=10, what="the standby")

    kept = await queue_kit.submit("kept", {"seconds": 0})
    ends = await event_log.wait_terminal([kept])
    assert ends[kept].status is S.COMPLETED
    assert "the queue does not exist; letting it go" in caplog.text
    assert "session broken" not in caplog.text  # it cost no session, its or the owner's
    assert standby.sessions == 1
    assert set(session.owners) == {(project, "kept")}
