"""The worker's start latency: an execution's first run only, measured from its creation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from observe import ObserveSettings
from schemas.dispatch import decode_work, encode_work
from schemas.envelope import make_submission
from schemas.ids import rfc3339, unix_seconds
from worker._context import ExecutionContext
from worker._observe import WorkerObserver

SECONDS_AGO = 2.0


def context(
    *, retry_count: int = 0, redelivered: bool = False, created_at: str
) -> ExecutionContext:
    raw = make_submission(execution_id="e1", created_at=created_at, workflow_id="w")
    work = decode_work(
        encode_work(
            dispatch_id="d1",
            deadline=time.time() + 60,
            results_queue="r",
            submission_raw=raw,
            retry_count=retry_count,
        )
    )
    return ExecutionContext.from_work(work, worker_id="w1", redelivered=redelivered)


async def handler(ctx: ExecutionContext, payload: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("retry_count", "redelivered", "counted"),
    [(0, False, True), (1, False, False), (0, True, False)],
)
async def test_only_a_first_run_counts_and_from_its_creation(
    retry_count: int, redelivered: bool, counted: bool
) -> None:
    observer = WorkerObserver(ObserveSettings(), running=lambda: 0, concurrency=1)
    run = observer.wrap("w", handler)
    created = rfc3339(time.time_ns() - int(SECONDS_AGO * 1e9))
    await run(context(retry_count=retry_count, redelivered=redelivered, created_at=created), None)
    labels = {"workflow": "w"}
    count = observer.registry.get_sample_value("polos_worker_start_latency_seconds_count", labels)
    total = observer.registry.get_sample_value("polos_worker_start_latency_seconds_sum", labels)
    assert count == (1 if counted else 0)
    if counted:
        assert total is not None
        assert SECONDS_AGO <= total < SECONDS_AGO + 5


def test_unix_seconds_reads_what_rfc3339_writes_and_nothing_else() -> None:
    assert unix_seconds(rfc3339(1_764_633_600_123_456_000)) == pytest.approx(1_764_633_600.123456)
    assert unix_seconds("2026-12-02T01:54:31+00:00") == pytest.approx(1_796_176_471.0)
    assert unix_seconds("") is None
    assert unix_seconds("yesterday") is None
