"""A workflow's runs: newest first, filtered by status, paginated by an opaque cursor."""

from __future__ import annotations

import random
import time

import pytest
import redis.asyncio as aioredis

from schemas.dispatch import ExecutionStatus
from store import MAX_LIST_LIMIT, ExecutionStore, InvalidCursor
from store.layout import record_key
from tests.store_support import Run

RETENTION = 3600


@pytest.fixture
def store(redis: aioredis.Redis, uid: str) -> ExecutionStore:
    return ExecutionStore(redis, RETENTION, key_prefix=f"test:{uid}:")


def runs(project_id: str, count: int, workflow_id: str = "summarize") -> list[Run]:
    """``count`` runs created one millisecond apart, oldest first."""
    start = time.time_ns() // 1_000_000 - count
    return [Run(project_id, workflow_id, created_ms=start + i) for i in range(count)]


async def test_runs_are_listed_newest_first(store: ExecutionStore, uid: str) -> None:
    made = runs(uid, 6)
    shuffled = made[:]
    random.shuffle(shuffled)
    await store.record([run.admitted() for run in shuffled])

    page, cursor = await store.list_runs(uid, "summarize")
    assert [r.id for r in page] == [run.execution_id for run in reversed(made)]
    assert cursor is None


async def test_status_filter_lists_only_that_status_and_follows_changes(
    store: ExecutionStore, uid: str
) -> None:
    made = runs(uid, 6)
    await store.record([run.admitted() for run in made])
    await store.record([made[i].completed() for i in (0, 2, 4)])
    await store.record([made[1].failed()])

    completed, _ = await store.list_runs(uid, "summarize", status=ExecutionStatus.COMPLETED)
    assert [r.id for r in completed] == [made[i].execution_id for i in (4, 2, 0)]
    assert all(r.status == ExecutionStatus.COMPLETED for r in completed)
    admitted, _ = await store.list_runs(uid, "summarize", status=ExecutionStatus.ADMITTED)
    assert [r.id for r in admitted] == [made[i].execution_id for i in (5, 3)]

    await store.record([made[3].running()])
    admitted, _ = await store.list_runs(uid, "summarize", status=ExecutionStatus.ADMITTED)
    running, _ = await store.list_runs(uid, "summarize", status=ExecutionStatus.RUNNING)
    assert [r.id for r in admitted] == [made[5].execution_id]
    assert [r.id for r in running] == [made[3].execution_id]
    everything, _ = await store.list_runs(uid, "summarize")
    assert len(everything) == 6


async def test_cursor_pages_through_every_run_once(store: ExecutionStore, uid: str) -> None:
    made = runs(uid, 7)
    await store.record([run.admitted() for run in made])

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        page, cursor = await store.list_runs(uid, "summarize", limit=3, cursor=cursor)
        pages += 1
        seen.extend(r.id for r in page)
        if cursor is None:
            break
    assert pages == 3
    assert seen == [run.execution_id for run in reversed(made)]


async def test_cursor_pages_a_status_filter(store: ExecutionStore, uid: str) -> None:
    made = runs(uid, 8)
    await store.record([run.admitted() for run in made])
    await store.record([run.failed() for run in made[::2]])

    first, cursor = await store.list_runs(uid, "summarize", status=ExecutionStatus.FAILED, limit=2)
    assert cursor is not None
    second, last = await store.list_runs(
        uid, "summarize", status=ExecutionStatus.FAILED, limit=2, cursor=cursor
    )
    assert last is None
    assert [r.id for r in first + second] == [run.execution_id for run in reversed(made[::2])]


async def test_a_full_last_page_has_no_next_cursor(store: ExecutionStore, uid: str) -> None:
    made = runs(uid, 4)
    await store.record([run.admitted() for run in made])

    page, cursor = await store.list_runs(uid, "summarize", limit=4)
    assert len(page) == 4
    assert cursor is None


async def test_only_the_workflows_own_runs_are_listed(store: ExecutionStore, uid: str) -> None:
    mine = runs(uid, 2, "summarize")
    other_workflow = runs(uid, 2, "translate")
    other_project = runs(f"{uid}-b", 2, "summarize")
    await store.record([run.admitted() for run in mine + other_workflow + other_project])

    page, _ = await store.list_runs(uid, "summarize")
    assert {r.id for r in page} == {run.execution_id for run in mine}


async def test_expired_records_are_skipped_and_the_page_still_fills(
    store: ExecutionStore, redis: aioredis.Redis, uid: str
) -> None:
    made = runs(uid, 6)
    await store.record([run.admitted() for run in made])
    # Two records expired before the index was trimmed.
    for run in (made[5], made[3]):
        await redis.delete(record_key(f"test:{uid}:", uid, run.execution_id))

    page, cursor = await store.list_runs(uid, "summarize", limit=3)
    assert [r.id for r in page] == [made[i].execution_id for i in (4, 2, 1)]
    assert cursor is not None
    rest, cursor = await store.list_runs(uid, "summarize", limit=3, cursor=cursor)
    assert [r.id for r in rest] == [made[0].execution_id]
    assert cursor is None


async def test_runs_created_before_the_retention_are_not_listed(
    store: ExecutionStore, uid: str
) -> None:
    old = Run(uid, created_ms=time.time_ns() // 1_000_000 - (RETENTION + 60) * 1000)
    new = Run(uid)
    await store.record([old.admitted(), new.admitted()])

    page, _ = await store.list_runs(uid, "summarize")
    assert [r.id for r in page] == [new.execution_id]


@pytest.mark.parametrize("cursor", ["", "not-a-cursor", "Zm9v", "////"])
async def test_a_cursor_we_never_issued_is_refused(
    store: ExecutionStore, uid: str, cursor: str
) -> None:
    with pytest.raises(InvalidCursor):
        await store.list_runs(uid, "summarize", cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, MAX_LIST_LIMIT + 1])
async def test_limit_out_of_range_is_refused(store: ExecutionStore, uid: str, limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.list_runs(uid, "summarize", limit=limit)
