"""The execution store keeps one record per execution, never moved backwards."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import redis.asyncio as aioredis

import store.execution_store as execution_store_module
from schemas.dispatch import ExecutionStatus
from schemas.records import ExecutionRecord
from store import ExecutionStore, StoreUnavailable, open_redis
from store.layout import index_key, record_key
from store.update import APPLY_BATCH_LUA
from tests.store_support import Run

RETENTION = 3600


@pytest.fixture
def store(redis: aioredis.Redis, uid: str) -> ExecutionStore:
    return ExecutionStore(redis, RETENTION, key_prefix=f"test:{uid}:")


async def test_full_lifecycle_is_recorded_with_the_submission(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid, payload={"to": "ada@example.com"})
    await store.record(run.lifecycle())

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.COMPLETED
    assert record.id == run.execution_id
    assert record.project_id == uid
    assert record.workflow_id == "summarize"
    assert record.payload == {"to": "ada@example.com"}
    assert record.result == {"done": run.execution_id}
    assert record.created_at == run.created_at
    assert record.admitted_at is not None
    assert record.started_at is not None
    assert record.completed_at is not None
    assert record.admitted_at < record.started_at < record.completed_at
    assert record.deployment_id == "dep-1"
    assert record.queue_name == "emails"
    assert record.session_id == f"session-{run.execution_id}"
    assert record.user_id == "user-7"
    assert record.run_timeout_seconds == 60
    assert record.worker_id == "worker-1"
    assert record.error is None


async def test_completed_is_not_moved_back_by_a_late_running(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    admitted, running, completed = run.lifecycle()
    await store.record([admitted, completed])
    await store.record([running])  # arrives last, e.g. redelivered after a takeover

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.COMPLETED
    assert record.result == {"done": run.execution_id}
    assert record.completed_at == completed.at
    # The late event still contributes the fact it carries.
    assert record.started_at == running.at


async def test_a_terminal_record_is_never_replaced_by_another_terminal(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    timed_out = run.event(ExecutionStatus.TIMED_OUT)
    await store.record([run.admitted(), run.running(), timed_out])
    await store.record([run.completed(result={"late": True})])  # the result after the timeout

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.TIMED_OUT
    assert record.result is None
    assert record.completed_at == timed_out.at


async def test_fields_from_the_first_event_are_kept_when_later_events_lack_them(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid, concurrency_key="tenant-9")
    await store.record([run.admitted()])
    # Later events carry no submission, no concurrency key and no worker.
    await store.record(
        [run.event(ExecutionStatus.RUNNING), run.event(ExecutionStatus.COMPLETED, result=None)]
    )

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.COMPLETED
    assert record.payload == run.payload
    assert record.session_id == f"session-{run.execution_id}"
    assert record.concurrency_key == "tenant-9"
    assert record.created_at == run.created_at


async def test_a_late_submission_fills_a_record_that_is_already_terminal(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    admitted, running, completed = run.lifecycle()
    await store.record([completed])
    early = await store.get(uid, run.execution_id)
    assert early is not None
    assert early.status == ExecutionStatus.COMPLETED
    assert early.payload is None
    # Before the submission arrives, the creation time comes from the UUIDv7 itself.
    assert early.created_at[:23] == run.created_at[:23]

    await store.record([running, admitted])
    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.COMPLETED
    assert record.payload == run.payload
    assert record.created_at == run.created_at
    assert record.admitted_at == admitted.at


async def test_any_order_and_any_redelivery_end_in_the_same_record(
    store: ExecutionStore, uid: str
) -> None:
    records: list[ExecutionRecord] = []
    for order in itertools.permutations(range(3)):
        run = Run(uid, payload={"same": True})
        events = run.lifecycle()
        # One at a time in this order, then the whole lot again in one batch.
        for i in order:
            await store.record([events[i]])
        await store.record([events[i] for i in reversed(order)])
        record = await store.get(uid, run.execution_id)
        assert record is not None
        records.append(record)

    def comparable(record: ExecutionRecord) -> dict[str, object]:
        return record.model_dump(
            exclude={
                "id",
                "created_at",
                "admitted_at",
                "started_at",
                "completed_at",
                "result",
                "session_id",
            }
        )

    assert all(r.status == ExecutionStatus.COMPLETED for r in records)
    assert all(r.started_at and r.admitted_at and r.completed_at for r in records)
    assert len({str(comparable(r)) for r in records}) == 1


async def test_running_after_a_takeover_moves_to_the_newer_worker(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    first = run.running(worker_id="worker-a")
    second = run.running(worker_id="worker-b")  # later: the execution was dispatched again
    await store.record([run.admitted(), second, first])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.RUNNING
    assert record.worker_id == "worker-b"
    assert record.started_at == first.at


async def test_failed_carries_the_error_as_polos_sends_it(store: ExecutionStore, uid: str) -> None:
    run = Run(uid)
    await store.record([run.admitted(), run.running(), run.failed("no such user")])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.FAILED
    assert record.error == "ValueError: no such user"
    assert record.error_details is not None
    assert record.error_details.traceback == "Traceback ..."
    assert record.result is None


async def test_deduplicated_points_at_the_execution_holding_the_key(
    store: ExecutionStore, uid: str
) -> None:
    holder = Run(uid, concurrency_key="k")
    duplicate = Run(uid, concurrency_key="k")
    await store.record(
        [
            holder.admitted(),
            duplicate.event(
                ExecutionStatus.DEDUPLICATED,
                duplicate_of=holder.execution_id,
                submission=duplicate.submission(),
            ),
        ]
    )

    record = await store.get(uid, duplicate.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.DEDUPLICATED
    assert record.duplicate_of == holder.execution_id
    assert record.payload == duplicate.payload
    assert record.started_at is None
    assert record.completed_at is not None


async def test_cancelled_records_when(store: ExecutionStore, uid: str) -> None:
    run = Run(uid)
    cancelled = run.event(ExecutionStatus.CANCELLED)
    await store.record([run.admitted(), cancelled])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.CANCELLED
    assert record.cancelled_at == cancelled.at == record.completed_at


async def test_another_projects_execution_is_invisible(store: ExecutionStore, uid: str) -> None:
    run = Run(uid)
    await store.record(run.lifecycle())

    assert await store.get(f"{uid}-other", run.execution_id) is None
    assert await store.list_runs(f"{uid}-other", run.workflow_id) == ([], None)
    assert await store.get(uid, run.execution_id) is not None


async def test_unknown_execution_is_none(store: ExecutionStore, uid: str) -> None:
    assert await store.get(uid, Run(uid).execution_id) is None


async def test_records_and_indexes_expire_after_the_retention(
    store: ExecutionStore, redis: aioredis.Redis, uid: str
) -> None:
    run = Run(uid)
    await store.record(run.lifecycle())

    prefix = f"test:{uid}:"
    for key in (
        record_key(prefix, uid, run.execution_id),
        index_key(prefix, uid, run.workflow_id),
        index_key(prefix, uid, run.workflow_id, ExecutionStatus.COMPLETED),
    ):
        ttl = await redis.ttl(key)
        assert 0 < ttl <= RETENTION, key


async def test_a_record_is_gone_once_its_retention_passed(redis: aioredis.Redis, uid: str) -> None:
    short = ExecutionStore(redis, 1, key_prefix=f"test:{uid}:")
    run = Run(uid)
    await short.record([run.admitted()])
    assert await short.get(uid, run.execution_id) is not None

    deadline = time.monotonic() + 5
    while await short.get(uid, run.execution_id) is not None:
        assert time.monotonic() < deadline, "the record outlived its retention"
        await asyncio.sleep(0.1)
    assert await short.list_runs(uid, run.workflow_id) == ([], None)


async def test_the_script_is_loaded_again_when_redis_lost_it(
    redis: aioredis.Redis, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A script text Redis has never seen: the first EVALSHA answers NOSCRIPT, as
    # after a Redis restart. (The shared Redis's script cache is left alone.)
    fresh = f"{APPLY_BATCH_LUA}\n-- {uid}\n"
    import hashlib

    monkeypatch.setattr(execution_store_module, "APPLY_BATCH_LUA", fresh)
    monkeypatch.setattr(
        execution_store_module, "APPLY_BATCH_SHA", hashlib.sha1(fresh.encode()).hexdigest()
    )
    store = ExecutionStore(redis, RETENTION, key_prefix=f"test:{uid}:")
    run = Run(uid)
    await store.record(run.lifecycle())

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == ExecutionStatus.COMPLETED


async def test_redis_unreachable_is_store_unavailable(uid: str) -> None:
    # A port nothing listens on: connection refused at once.
    client = open_redis("redis://127.0.0.1:1/0", timeout_seconds=0.5)
    store = ExecutionStore(client, RETENTION, key_prefix=f"test:{uid}:")
    run = Run(uid)
    try:
        with pytest.raises(StoreUnavailable):
            await store.record(run.lifecycle())
        with pytest.raises(StoreUnavailable):
            await store.get(uid, run.execution_id)
        with pytest.raises(StoreUnavailable):
            await store.list_runs(uid, run.workflow_id)
    finally:
        await client.aclose()
