"""Poison messages: kept once in the dead-letter queue with the reason, never looping."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from broker.deadletter import REASON_HEADER
from broker.publisher import ConfirmedPublisher
from schemas.dispatch import ExecutionStatus
from schemas.topology import results_queue, submit_queue
from tests.conftest import DispatcherFactory, ProbeFactory, queue_depth
from tests.dispatcher_support import EventLog, QueueKit, in_flight_per_ledger
from tests.worker_harness import take_dead_letters

S = ExecutionStatus


async def dead_letters(
    connection: AbstractConnection, source: str, count: int, *, timeout: float = 5.0
) -> list[AbstractIncomingMessage]:
    """Take the dead letters of ``source`` until ``count`` arrived (or the timeout)."""
    taken: list[AbstractIncomingMessage] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        taken += await take_dead_letters(connection, source)
        if (len(taken) >= count and count) or loop.time() >= deadline:
            return taken
        await asyncio.sleep(0.1)


async def test_undecodable_submission_and_result_are_dead_lettered_once(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
    amqp: AbstractConnection,
    uid: str,
) -> None:
    await queue_kit.declare("q", limit=1)
    probe = await start_probe()
    dispatcher = await make_dispatcher()
    await queue_kit.publish_raw("q", b"\x00not json")
    await queue_kit.publish_raw("q", b'{"type": "submission", "execution_id": 42}')
    good = await queue_kit.submit("q", {"seconds": 0.05})
    assert (await event_log.wait_terminal([good]))[good].status is S.COMPLETED
    publisher = ConfirmedPublisher(amqp, confirm_timeout=5.0, channels=1)
    await publisher.start()
    bogus = [
        b'{"type": "bogus"}',
        # A worker's batch of reports with none in it, or with one that is not a report.
        b'{"type": "results", "reports": []}',
        b'{"type": "results", "reports": [{"type": "heartbeat", "worker_id": "w"}]}',
    ]
    for n, body in enumerate(bogus):
        await publisher.publish(results_queue(uid, "q"), body, message_id=f"x{n}")
    await publisher.close()

    dead = await dead_letters(amqp, submit_queue(uid, "q"), 2)
    assert sorted(m.body for m in dead) == [
        b"\x00not json",
        b'{"type": "submission", "execution_id": 42}',
    ]
    assert all("undecodable submission" in str(m.headers[REASON_HEADER]) for m in dead)
    results = await dead_letters(amqp, results_queue(uid, "q"), len(bogus))
    assert sorted(m.body for m in results) == sorted(bogus)
    assert all("undecodable result" in str(m.headers[REASON_HEADER]) for m in results)
    await dispatcher.stop()
    assert await dead_letters(amqp, submit_queue(uid, "q"), 0, timeout=1.0) == []
    # Acknowledged after being kept: nothing comes back to be tried again.
    assert await queue_depth(amqp, submit_queue(uid, "q")) == 0
    assert await in_flight_per_ledger(amqp, results_queue(uid, "q")) == set()
    assert probe.runs == [good]
