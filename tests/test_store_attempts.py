"""A decision of a later delivery attempt supersedes those of earlier ones (DESIGN §3).

Under a broker crash an owner may decide ``deduplicated``, publish the event and
lose the submission's acknowledgement; the redelivery is decided again (the key
is free now), runs and completes. Events carry the attempt they were decided
under, and the record ends as what ran, whatever order the recorder sees them in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from schemas.dispatch import ExecutionStatus, LifecycleEvent
from schemas.records import ExecutionRecord
from store import ExecutionStore
from store.layout import record_key
from tests.store_support import Run

S = ExecutionStatus


def _events(run: Run) -> dict[str, LifecycleEvent]:
    """The issue's history: attempt 0 decided deduplicated, attempt 1 ran."""
    submission = run.submission()
    return {
        "queued@0": run.event(S.QUEUED, submission=submission),
        "deduplicated@0": run.event(
            S.DEDUPLICATED, duplicate_of="0190b6c5-0000-7000-8000-000000000000", attempt=0
        ),
        "admitted@1": run.event(S.ADMITTED, submission=submission, dispatch_id="d1", attempt=1),
        "running@1": run.event(S.RUNNING, worker_id="w1", dispatch_id="d1", attempt=1),
        "completed@1": run.event(
            S.COMPLETED, worker_id="w1", dispatch_id="d1", result={"ok": 1}, attempt=1
        ),
    }


ORDERS = list(
    itertools.permutations(["queued@0", "deduplicated@0", "admitted@1", "running@1", "completed@1"])
)


async def test_a_redelivered_decision_supersedes_the_lost_one_in_every_order(
    store: ExecutionStore, uid: str
) -> None:
    runs = [Run(uid) for _ in ORDERS]
    histories = [_events(run) for run in runs]
    # One record per order, each event applied in its own round trip.
    for step in range(5):
        await store.record([h[order[step]] for h, order in zip(histories, ORDERS, strict=True)])

    for run, history, order in zip(runs, histories, ORDERS, strict=True):
        record = await store.get(uid, run.execution_id)
        assert record is not None
        assert record.status == S.COMPLETED, order
        assert record.duplicate_of is None, order
        assert record.result == {"ok": 1}, order
        assert record.admitted_at == history["admitted@1"].at, order
        assert record.started_at == history["running@1"].at, order
        assert record.completed_at == history["completed@1"].at, order
        assert record.worker_id == "w1", order
        assert record.payload == run.payload, order
        assert record.session_id == f"session-{run.execution_id}", order


async def test_the_superseded_status_leaves_its_listing(store: ExecutionStore, uid: str) -> None:
    run = Run(uid)
    history = _events(run)
    await store.record([history["queued@0"], history["deduplicated@0"]])
    deduplicated, _ = await store.list_runs(uid, run.workflow_id, S.DEDUPLICATED)
    assert [r.id for r in deduplicated] == [run.execution_id]

    await store.record([history["admitted@1"], history["completed@1"]])

    deduplicated, _ = await store.list_runs(uid, run.workflow_id, S.DEDUPLICATED)
    completed, _ = await store.list_runs(uid, run.workflow_id, S.COMPLETED)
    assert deduplicated == []
    assert [r.id for r in completed] == [run.execution_id]


Check = Callable[[ExecutionRecord], None]


def _build(run: Run, name: str) -> LifecycleEvent:
    status, attempt = name.split("@")
    fields: dict[str, object] = {"attempt": int(attempt)}
    if status in ("admitted", "deduplicated", "queued"):
        fields["submission"] = run.submission()
    if status in ("running", "completed", "failed"):
        fields["worker_id"] = f"w{attempt}"
    if status == "completed":
        fields["result"] = {"attempt": int(attempt)}
    if status == "deduplicated":
        fields["duplicate_of"] = f"holder-{attempt}"
    return run.event(S(status), **fields)


# (events applied one at a time, in this order; the status, and what else must hold)
TABLE: list[tuple[list[str], S, dict[str, object]]] = [
    # A lower attempt arriving late changes nothing the decision of a higher one set...
    (["admitted@1", "completed@1", "deduplicated@0"], S.COMPLETED, {"duplicate_of": None}),
    (["running@2", "completed@1", "failed@0"], S.RUNNING, {"worker_id": "w2", "result": None}),
    # ... but still contributes the submission's facts the record lacks.
    (["running@1", "deduplicated@0"], S.RUNNING, {"session_id": "set", "worker_id": "w1"}),
    # A higher attempt replaces even a terminal record, with a lower rank.
    (["admitted@0", "running@0", "completed@0", "admitted@1"], S.ADMITTED, {"result": None}),
    (
        ["deduplicated@0", "running@1"],
        S.RUNNING,
        {"duplicate_of": None, "completed_at": None, "admitted_at": None},
    ),
    (["deduplicated@0", "deduplicated@1"], S.DEDUPLICATED, {"duplicate_of": "holder-1"}),
    (["completed@1", "completed@3", "completed@2"], S.COMPLETED, {"result": {"attempt": 3}}),
    # Within one attempt the monotonic rule holds as before: a terminal record stays.
    (["deduplicated@1", "admitted@1", "completed@1"], S.DEDUPLICATED, {"result": None}),
    (["completed@0", "running@0"], S.COMPLETED, {"result": {"attempt": 0}}),
    # The gateway's queued is attempt 0: never above what a dispatcher decided.
    (["admitted@2", "queued@0"], S.ADMITTED, {"session_id": "set"}),
]


@pytest.mark.parametrize(("order", "status", "expected"), TABLE, ids=lambda v: str(v))
async def test_attempts_order_the_decisions(
    store: ExecutionStore, uid: str, order: list[str], status: S, expected: dict[str, object]
) -> None:
    run = Run(uid)
    for name in order:
        await store.record([_build(run, name)])

    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == status
    for field, value in expected.items():
        actual = getattr(record, field)
        if value == "set":
            assert actual is not None, field
        else:
            assert actual == value, field


async def test_a_record_from_before_attempts_counts_as_attempt_0(
    store: ExecutionStore, redis: aioredis.Redis, uid: str
) -> None:
    run = Run(uid)
    await store.record([_build(run, "deduplicated@0")])
    await redis.hdel(record_key(store.key_prefix, uid, run.execution_id), "attempt")

    await store.record([_build(run, "completed@0")])
    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == S.DEDUPLICATED

    await store.record([_build(run, "completed@1")])
    record = await store.get(uid, run.execution_id)
    assert record is not None
    assert record.status == S.COMPLETED
    assert record.duplicate_of is None
