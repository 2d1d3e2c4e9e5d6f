"""Retries against the real broker: a real dispatcher, a real worker (the SDK), the recorder.

A workflow that fails is run again as its policy says (``@worker.workflow(...,
retries=, backoff=)``), each run a new dispatch with ``retry_count + 1``; the
record counts the retries and keeps each failed run's error. A waiting retry
holds its queue slot: with a limit of 1, the next submission waits for it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.dispatch import CancelRequest, ExecutionStatus, encode
from schemas.ids import now_rfc3339
from schemas.records import ExecutionRecord
from schemas.topology import results_queue
from store import ExecutionStore
from tests.conftest import DispatcherFactory
from tests.dispatcher_support import (
    DEPLOYMENT,
    EventLog,
    QueueKit,
    dispatcher_process,
    wait_for_log,
)
from tests.store_support import RecorderFactory, eventually
from worker import Backoff, ExecutionContext, NonRetryableError, Worker

S = ExecutionStatus
QUICK = Backoff(first=0.1, jitter=0)


@dataclass
class Runs:
    """What the workflows saw: each run's (execution, retry_count, dispatch_id)."""

    seen: list[tuple[str, int, str]] = field(default_factory=list)

    def of(self, execution_id: str) -> list[tuple[int, str]]:
        return [(n, d) for e, n, d in self.seen if e == execution_id]

    def note(self, ctx: ExecutionContext) -> None:
        self.seen.append((ctx.execution_id, ctx.retry_count, ctx.dispatch_id))

    async def flaky(self, ctx: ExecutionContext, payload: Any) -> Any:
        """Fails its first ``payload["failures"]`` runs."""
        self.note(ctx)
        if ctx.retry_count < payload["failures"]:
            raise ConnectionError(f"run {ctx.retry_count + 1} failed")
        return {"runs": ctx.retry_count + 1}

    async def final(self, ctx: ExecutionContext, payload: Any) -> Any:
        self.note(ctx)
        raise NonRetryableError("the card was declined")

    async def quick(self, ctx: ExecutionContext, payload: Any) -> Any:
        self.note(ctx)
        return payload


@pytest.fixture
async def runs(amqp_url: str, uid: str) -> AsyncIterator[Runs]:
    runs = Runs()
    worker = Worker(project=uid, deployment=DEPLOYMENT, concurrency=8, amqp_url=amqp_url)
    worker.add_workflow("flaky", runs.flaky, backoff=QUICK)  # the default: 2 retries
    worker.add_workflow("final", runs.final, backoff=QUICK)
    worker.add_workflow("quick", runs.quick, retries=0)
    worker.add_workflow("slow_retry", runs.flaky, backoff=Backoff(first=1.5, jitter=0))
    worker.add_workflow("patient", runs.flaky, retries=5, backoff=Backoff(first=2, jitter=0))
    await worker.start()
    yield runs
    await worker.stop(drain_timeout=0)


@pytest.fixture
async def system(
    make_recorder: RecorderFactory,
    queue_kit: QueueKit,
    make_dispatcher: DispatcherFactory,
    runs: Runs,
) -> QueueKit:
    await make_recorder()  # bound before anything is dispatched
    await queue_kit.declare("q")
    await queue_kit.declare("one", limit=1)
    await make_dispatcher()
    return queue_kit


async def _record(store: ExecutionStore, uid: str, execution_id: str) -> ExecutionRecord:
    async def terminal() -> bool:
        record = await store.get(uid, execution_id)
        return record is not None and record.status in (S.COMPLETED, S.FAILED, S.CANCELLED)

    await eventually(terminal, what=f"the terminal record of {execution_id}")
    record = await store.get(uid, execution_id)
    assert record is not None
    return record


async def test_a_workflow_failing_twice_then_succeeding_completes_with_both_errors(
    system: QueueKit, event_log: EventLog, runs: Runs, store: ExecutionStore, uid: str
) -> None:
    execution_id = await system.submit("q", {"failures": 2}, workflow="flaky")
    completed = await event_log.wait_status(execution_id, S.COMPLETED, timeout=20)
    assert completed.result == {"runs": 3}
    assert completed.retry_count == 2
    # Three runs, each its own dispatch.
    assert [n for n, _ in runs.of(execution_id)] == [0, 1, 2]
    assert len({d for _, d in runs.of(execution_id)}) == 3
    retries = [e for e in event_log.of(execution_id) if e.retry_at is not None]
    assert [(e.status, e.retry_count) for e in retries] == [(S.RUNNING, 0), (S.RUNNING, 1)]
    record = await _record(store, uid, execution_id)
    assert record.status is S.COMPLETED
    assert record.retry_count == 2
    assert [(a.attempt, a.error) for a in record.attempt_errors] == [
        (1, "ConnectionError: run 1 failed"),
        (2, "ConnectionError: run 2 failed"),
    ]
    assert record.error is None


async def test_a_non_retryable_error_ends_failed_at_once(
    system: QueueKit, event_log: EventLog, runs: Runs, store: ExecutionStore, uid: str
) -> None:
    execution_id = await system.submit("q", None, workflow="final")
    failed = await event_log.wait_status(execution_id, S.FAILED, timeout=20)
    assert failed.error is not None
    assert failed.error.type == "NonRetryableError"
    assert len(runs.of(execution_id)) == 1
    record = await _record(store, uid, execution_id)
    assert (record.status, record.retry_count) == (S.FAILED, 0)
    assert record.error == "NonRetryableError: the card was declined"


async def test_retries_exhausted_end_failed_with_every_runs_error(
    system: QueueKit, event_log: EventLog, runs: Runs, store: ExecutionStore, uid: str
) -> None:
    execution_id = await system.submit("q", {"failures": 9}, workflow="flaky")
    await event_log.wait_status(execution_id, S.FAILED, timeout=20)
    assert [n for n, _ in runs.of(execution_id)] == [0, 1, 2]  # the first run and 2 retries
    record = await _record(store, uid, execution_id)
    assert record.status is S.FAILED
    assert record.retry_count == 2
    assert record.error == "ConnectionError: run 3 failed"
    assert [a.attempt for a in record.attempt_errors] == [1, 2, 3]


async def test_the_run_timeout_covers_every_run_so_a_retry_past_it_is_none(
    system: QueueKit, event_log: EventLog, runs: Runs, store: ExecutionStore, uid: str
) -> None:
    # Waits of 1.5 s then 3 s: the second retry would start after the 3 s deadline.
    execution_id = await system.submit("q", {"failures": 9}, workflow="slow_retry", run_timeout=3)
    failed = await event_log.wait_status(execution_id, S.FAILED, timeout=20)
    assert failed.error is not None
    assert failed.error.message == "run 2 failed"
    assert [n for n, _ in runs.of(execution_id)] == [0, 1]
    record = await _record(store, uid, execution_id)
    assert record.retry_count == 1
    assert len(record.attempt_errors) == 2


async def test_a_waiting_retry_holds_its_slot_so_the_next_waits_with_a_limit_of_one(
    system: QueueKit, event_log: EventLog, runs: Runs
) -> None:
    first = await system.submit("one", {"failures": 1}, workflow="slow_retry")
    await event_log.wait_for(
        lambda: any(e.retry_at for e in event_log.of(first)), what="the retry of the first"
    )
    second = await system.submit("one", {"n": 2}, workflow="quick")
    ends = await event_log.wait_terminal([first, second], timeout=20)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    order = [(e.execution_id, e.status) for e in event_log.events if e.status is not S.QUEUED]
    # The second is admitted only once the first, retried, is over.
    assert order.index((second, S.ADMITTED)) > order.index((first, S.COMPLETED))
    assert [x for x, *_ in runs.seen] == [first, first, second]


async def test_a_cancel_during_the_retry_wait_ends_it_and_no_retry_runs(
    system: QueueKit, event_log: EventLog, runs: Runs, store: ExecutionStore, uid: str
) -> None:
    execution_id = await system.submit("one", {"failures": 9}, workflow="patient")
    await event_log.wait_for(
        lambda: any(e.retry_at for e in event_log.of(execution_id)), what="the retry wait"
    )
    request = CancelRequest(
        execution_id=execution_id, requested_by="key_test", at=now_rfc3339(), seen_status=S.RUNNING
    )
    await system.publish_to(results_queue(uid, "one"), encode(request))
    cancelled = await event_log.wait_status(execution_id, S.CANCELLED, timeout=10)
    assert cancelled.cancelled_by == "key_test"
    # Its slot is free at once (limit 1): the next one runs.
    following = await system.submit("one", None, workflow="quick")
    await event_log.wait_status(following, S.COMPLETED, timeout=10)
    # And once the retry would have been due, it has not run.
    [retry] = [e for e in event_log.of(execution_id) if e.retry_at]
    assert retry.retry_at is not None
    await asyncio.sleep(
        max(0.0, datetime.fromisoformat(retry.retry_at).timestamp() - time.time()) + 0.5
    )
    assert len(runs.of(execution_id)) == 1
    record = await _record(store, uid, execution_id)
    assert (record.status, record.retry_count) == (S.CANCELLED, 1)


async def test_work_for_a_workflow_the_worker_lacks_ends_failed_and_frees_its_slot(
    system: QueueKit, event_log: EventLog, runs: Runs, store: ExecutionStore, uid: str
) -> None:
    # A rolling deploy under one deployment id: the registry names a workflow that
    # this worker does not register. The run fails as a handler's would (the default
    # policy: two retries, each perhaps on a worker that has it), not held till its
    # run timeout.
    started = time.monotonic()
    missing = await system.submit("one", None, workflow="added_later", run_timeout=3600)
    failed = await event_log.wait_status(missing, S.FAILED, timeout=20)
    assert time.monotonic() - started < 15
    assert failed.error is not None
    assert failed.error.type == "WorkflowNotRegistered"
    assert "'added_later' is not registered" in failed.error.message
    assert runs.of(missing) == []
    record = await _record(store, uid, missing)
    assert (record.status, record.retry_count) == (S.FAILED, 2)
    # Its slot (limit 1) is free: the next one runs.
    following = await system.submit("one", None, workflow="quick")
    await event_log.wait_status(following, S.COMPLETED, timeout=10)


async def test_a_retry_waiting_when_its_owner_is_killed_is_dispatched_by_the_next(
    queue_kit: QueueKit,
    event_log: EventLog,
    runs: Runs,
    processes: list[subprocess.Popen[bytes]],
    amqp_url: str,
    uid: str,
    tmp_path: Path,
) -> None:
    await queue_kit.declare("one", limit=1)
    owner = dispatcher_process(amqp_url, uid, tmp_path / "a.log")
    processes.append(owner)
    await wait_for_log(tmp_path / "a.log", "dispatcher ready")
    standby = dispatcher_process(amqp_url, uid, tmp_path / "b.log")
    processes.append(standby)
    await wait_for_log(tmp_path / "b.log", "dispatcher ready")
    execution_id = await queue_kit.submit("one", {"failures": 1}, workflow="patient")
    await event_log.wait_for(
        lambda: any(e.retry_at for e in event_log.of(execution_id)), what="the retry wait"
    )
    following = await queue_kit.submit("one", None, workflow="quick")
    owner.send_signal(signal.SIGKILL)  # the retry lives on in its ledger only
    ends = await event_log.wait_terminal([execution_id, following], timeout=30)
    assert ends[execution_id].status is S.COMPLETED
    assert ends[execution_id].retry_count == 1
    assert ends[execution_id].result == {"runs": 2}
    assert [n for n, _ in runs.of(execution_id)] == [0, 1]
    # The new owner kept its slot while it waited (limit 1): the other ran after it.
    assert [x for x, *_ in runs.seen] == [execution_id, execution_id, following]
