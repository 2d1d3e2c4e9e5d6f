"""Retries in the record: the runs counted, each failed run's error kept, the end unmoved.

A run that fails and is retried is reported as ``running`` with its error and
``retry_at``; the record keeps that error apart (``attempt_errors``), counts
``retry_count`` as Polos does, and a retry event never moves a terminal record back,
in whatever order and however often the events arrive.
"""

from __future__ import annotations

import random

from schemas.dispatch import ErrorInfo, ExecutionStatus, LifecycleEvent
from store import ExecutionStore
from tests.store_support import Run

S = ExecutionStatus


def _error(n: int) -> ErrorInfo:
    return ErrorInfo(type="ConnectionError", message=f"flaky {n}", traceback=f"Traceback {n}")


def _run(run: Run, retry_count: int, *, attempt: int = 0) -> list[LifecycleEvent]:
    dispatch = f"d{retry_count + 1}"
    admitted = run.event(
        S.ADMITTED,
        submission=run.submission(),
        dispatch_id=dispatch,
        retry_count=retry_count,
        attempt=attempt,
    )
    running = run.event(
        S.RUNNING,
        worker_id=f"w{retry_count}",
        dispatch_id=dispatch,
        retry_count=retry_count,
        attempt=attempt,
    )
    return [admitted, running]


def _retry(run: Run, retry_count: int, *, attempt: int = 0) -> LifecycleEvent:
    return run.event(
        S.RUNNING,
        worker_id=f"w{retry_count}",
        dispatch_id=f"d{retry_count + 1}",
        error=_error(retry_count),
        retry_count=retry_count,
        retry_at=run.at(),
        attempt=attempt,
    )


def _twice_failed_then_completed(run: Run) -> list[LifecycleEvent]:
    events = [*_run(run, 0), _retry(run, 0), *_run(run, 1), _retry(run, 1), *_run(run, 2)]
    events.append(
        run.event(S.COMPLETED, worker_id="w2", dispatch_id="d3", result={"ok": 1}, retry_count=2)
    )
    return events


async def test_a_run_completed_after_two_failures_keeps_both_errors_in_any_order(
    store: ExecutionStore, uid: str
) -> None:
    draw = random.Random(12)
    for round_ in range(12):
        run = Run(uid)
        events = _twice_failed_then_completed(run)
        order = list(events)
        if round_ == 1:
            order.reverse()
        elif round_ > 1:
            draw.shuffle(order)
        for event in order:
            await store.record([event])
        await store.record(order)  # every event again: they are at-least-once

        record = await store.get(uid, run.execution_id)
        assert record is not None
        assert record.status is S.COMPLETED, order
        assert record.result == {"ok": 1}
        assert record.error is None
        assert record.retry_count == 2
        assert [(a.attempt, a.error, a.worker_id) for a in record.attempt_errors] == [
            (1, "ConnectionError: flaky 0", "w0"),
            (2, "ConnectionError: flaky 1", "w1"),
        ]
        assert record.attempt_errors[0].error_details.traceback == "Traceback 0"
        assert record.attempt_errors[0].retry_at == events[2].retry_at
        assert record.started_at == events[1].at  # the first run's start
        assert record.completed_at == events[-1].at


async def test_while_a_retry_waits_the_record_is_running_and_counts_it(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    retry = _retry(run, 0)
    await store.record([*_run(run, 0), retry])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status is S.RUNNING
    assert record.retry_count == 1
    assert record.error is None
    assert [(a.attempt, a.at, a.retry_at) for a in record.attempt_errors] == [
        (1, retry.at, retry.retry_at)
    ]


async def test_exhausted_retries_end_failed_with_every_runs_error(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    final = run.event(S.FAILED, worker_id="w2", dispatch_id="d3", error=_error(2), retry_count=2)
    events = [*_run(run, 0), _retry(run, 0), *_run(run, 1), _retry(run, 1), *_run(run, 2), final]
    await store.record([events[-1], *events[:-1]])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status is S.FAILED
    assert record.error == "ConnectionError: flaky 2"
    assert record.retry_count == 2
    assert [a.attempt for a in record.attempt_errors] == [1, 2, 3]
    assert record.attempt_errors[-1].retry_at is None


async def test_a_late_retry_event_never_moves_a_terminal_record_back(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    first = _run(run, 0)
    retry = _retry(run, 0)
    second = _run(run, 1)
    completed = run.event(S.COMPLETED, worker_id="w1", dispatch_id="d2", retry_count=1)
    await store.record([first[0], completed])
    await store.record([retry, *second, first[1]])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status is S.COMPLETED
    assert record.completed_at == completed.at
    assert record.worker_id == "w1"
    assert record.retry_count == 1
    assert [a.attempt for a in record.attempt_errors] == [1]
    completed_runs, _ = await store.list_runs(uid, run.workflow_id, S.COMPLETED)
    running_runs, _ = await store.list_runs(uid, run.workflow_id, S.RUNNING)
    assert [r.id for r in completed_runs] == [run.execution_id]
    assert running_runs == []
    assert completed_runs[0].retry_count == 1  # the listing shows the record's fields


async def test_retries_of_a_superseded_delivery_attempt_are_dropped(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    await store.record([*_run(run, 0, attempt=0), _retry(run, 0, attempt=0)])
    redecided = _run(run, 0, attempt=1)
    completed = run.event(S.COMPLETED, worker_id="w0", dispatch_id="d1", attempt=1)
    await store.record([*redecided, completed, _retry(run, 0, attempt=0)])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status is S.COMPLETED
    assert record.retry_count == 0
    assert record.attempt_errors == []


async def test_a_run_without_retries_has_a_count_of_zero_and_no_errors_listed(
    store: ExecutionStore, uid: str
) -> None:
    run = Run(uid)
    await store.record(run.lifecycle())
    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.retry_count == 0
    assert record.attempt_errors == []
    failed = Run(uid)
    await store.record([failed.admitted(), failed.failed("no")])
    record = await store.get(uid, failed.execution_id)
    assert record is not None
    assert [(a.attempt, a.error) for a in record.attempt_errors] == [(1, "ValueError: no")]
