"""The real dispatcher's lifecycle events, recorded: what the status API will serve."""

from __future__ import annotations

import pytest

from schemas.dispatch import ExecutionStatus
from store import ExecutionStore
from tests.conftest import DispatcherFactory, ProbeFactory
from tests.dispatcher_support import EventLog, Probe, QueueKit
from tests.store_support import RecorderFactory, eventually

S = ExecutionStatus


@pytest.fixture
async def probe(start_probe: ProbeFactory) -> Probe:
    return await start_probe(concurrency=8)


async def test_dispatched_executions_are_recorded_to_their_end(
    make_recorder: RecorderFactory,
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    probe: Probe,
    store: ExecutionStore,
    uid: str,
) -> None:
    await make_recorder()  # its queue is bound before anything is dispatched
    await queue_kit.declare("q", limit=1)
    await make_dispatcher()
    holder = await queue_kit.submit("q", {"seconds": 0.5}, key="user-7")
    await event_log.wait_status(holder, S.RUNNING)
    duplicate = await queue_kit.submit("q", {"seconds": 0.05}, key="user-7")
    await event_log.wait_terminal([holder, duplicate])

    async def recorded() -> bool:
        records = [await store.get(uid, e) for e in (holder, duplicate)]
        return all(r is not None and r.status in (S.COMPLETED, S.DEDUPLICATED) for r in records)

    await eventually(recorded, what="terminal records")
    record = await store.get(uid, holder)
    assert record is not None
    assert record.status == S.COMPLETED
    assert record.payload == {"seconds": 0.5}
    assert record.result == {"slept": 0.5}
    assert record.queue_name == "q"
    assert record.concurrency_key == "user-7"
    assert record.worker_id is not None
    assert record.admitted_at is not None
    assert record.started_at is not None
    assert record.completed_at is not None
    assert record.admitted_at <= record.started_at <= record.completed_at

    dup = await store.get(uid, duplicate)
    assert dup is not None
    assert dup.status == S.DEDUPLICATED
    assert dup.duplicate_of == holder
    assert dup.started_at is None

    runs, _ = await store.list_runs(uid, "sleep")
    assert [r.id for r in runs] == [duplicate, holder]
