"""Deduplication by concurrency_key: a duplicate never runs, and the key frees with its holder."""

from __future__ import annotations

import pytest
from aio_pika.abc import AbstractConnection

from schemas.dispatch import ExecutionStatus
from tests.conftest import DispatcherFactory, ProbeFactory
from tests.dispatcher_support import EventLog, Probe, QueueKit, probe_worker

S = ExecutionStatus


@pytest.fixture
async def probe(start_probe: ProbeFactory) -> Probe:
    return await start_probe(concurrency=16)


async def test_duplicate_key_ends_deduplicated_pointing_at_the_holder(
    queue_kit: QueueKit, event_log: EventLog, make_dispatcher: DispatcherFactory, probe: Probe
) -> None:
    # Limit 1: the duplicates reach the head of the queue while the holder
    # has the only slot; they are settled at once, not after it.
    await queue_kit.declare("q", limit=1)
    await make_dispatcher()
    holder = await queue_kit.submit("q", {"seconds": 1.5}, key="user-7")
    await event_log.wait_status(holder, S.RUNNING)

    duplicates = [await queue_kit.submit("q", {"seconds": 0.1}, key="user-7") for _ in range(3)]
    other = await queue_kit.submit("q", {"seconds": 0.1}, key="user-8")

    for duplicate in duplicates:
        event = await event_log.wait_status(duplicate, S.DEDUPLICATED)
        assert event.duplicate_of == holder
        assert event.submission is not None
        assert event.submission.concurrency_key == "user-7"
        assert event_log.statuses(duplicate) == [S.DEDUPLICATED]
    assert event_log.terminal(holder) == []  # settled while the holder still runs
    await event_log.wait_terminal([holder, other])
    assert event_log.statuses(holder) == [S.ADMITTED, S.RUNNING, S.COMPLETED]

    # The key is free again once its holder is terminal.
    again = await queue_kit.submit("q", {"seconds": 0.05}, key="user-7")
    assert (await event_log.wait_terminal([again]))[again].status is S.COMPLETED
    assert set(probe.runs) == {holder, other, again}


async def test_keys_are_scoped_to_project_and_queue(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    amqp: AbstractConnection,
    amqp_url: str,
    uid: str,
) -> None:
    other_project = f"{uid}x"
    other_kit = QueueKit(amqp, other_project)
    other_log = EventLog(amqp, other_project)
    other_probe = Probe()
    other_worker = probe_worker(amqp_url, other_project, other_probe)
    await other_kit.open()
    await other_log.open()
    await other_worker.start()
    try:
        await queue_kit.declare("a")
        await queue_kit.declare("b")
        await other_kit.declare("a")
        await make_dispatcher(dispatcher_queues=f"{uid}/*,{other_project}/*")

        first = await queue_kit.submit("a", {"seconds": 1.0}, key="k")
        await event_log.wait_status(first, S.RUNNING)
        other_queue = await queue_kit.submit("b", {"seconds": 0.05}, key="k")
        other_tenant = await other_kit.submit("a", {"seconds": 0.05}, key="k")
        same_queue = await queue_kit.submit("a", {"seconds": 0.05}, key="k")

        assert (await event_log.wait_terminal([other_queue]))[other_queue].status is S.COMPLETED
        ends = await other_log.wait_terminal([other_tenant])
        assert ends[other_tenant].status is S.COMPLETED
        duplicate = await event_log.wait_status(same_queue, S.DEDUPLICATED)
        assert duplicate.duplicate_of == first
    finally:
        await other_worker.stop(drain_timeout=0)
        await other_log.close()
        await other_kit.close()
