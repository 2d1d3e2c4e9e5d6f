"""``schemas.polos_events.run_events``: which events a record shows, table-driven (the
orderings a broker test cannot stage on demand)."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.polos_events import run_events
from schemas.records import ExecutionRecord

RUN = "0190f5a8-0000-7000-8000-000000000001"
T0, T1, T2, T3 = (f"2026-01-01T00:00:0{i}.000000Z" for i in range(4))


def record(status: str, **fields: Any) -> ExecutionRecord:
    return ExecutionRecord.model_validate(
        {"id": RUN, "workflow_id": "wf", "project_id": "p", "status": status, "created_at": T0}
        | fields
    )


@pytest.mark.parametrize(
    ("rec", "events"),
    [
        (record("queued"), [(1, "workflow_queued", T0)]),
        (
            record("admitted", admitted_at=T1),
            [(1, "workflow_queued", T0), (2, "workflow_admitted", T1)],
        ),
        (
            record("completed", admitted_at=T1, started_at=T2, completed_at=T3, result=5),
            [
                (1, "workflow_queued", T0),
                (2, "workflow_admitted", T1),
                (3, "workflow_start", T2),
                (4, "workflow_finish", T3),
            ],
        ),
        # Never admitted: a duplicate ends from the head of its queue.
        (
            record("deduplicated", completed_at=T1, duplicate_of="x"),
            [(1, "workflow_queued", T0), (4, "workflow_deduplicated", T1)],
        ),
        # Cancelled before it started.
        (
            record("cancelled", admitted_at=T1, completed_at=T2),
            [(1, "workflow_queued", T0), (2, "workflow_admitted", T1), (4, "workflow_cancel", T2)],
        ),
        # Its running report not recorded (yet): that event is missing, not invented.
        (
            record("timed_out", admitted_at=T1, completed_at=T3),
            [
                (1, "workflow_queued", T0),
                (2, "workflow_admitted", T1),
                (4, "workflow_timed_out", T3),
            ],
        ),
    ],
)
def test_one_event_per_status_the_record_shows(
    rec: ExecutionRecord, events: list[tuple[int, str, str]]
) -> None:
    assert [(e.sequence_id, e.event_type, e.created_at) for e in run_events(rec)] == events


def test_the_same_record_gives_the_same_events_everywhere() -> None:
    rec = record("completed", admitted_at=T1, started_at=T2, completed_at=T3, result={"a": 1})

    assert run_events(rec) == run_events(ExecutionRecord.model_validate(rec.model_dump()))
    assert len({e.id for e in run_events(rec)}) == 4


def test_what_each_transition_carries() -> None:
    rec = record(
        "completed",
        admitted_at=T1,
        started_at=T2,
        completed_at=T3,
        payload={"in": 1},
        result={"out": 2},
        worker_id="w1",
    )
    queued, admitted, start, finish = run_events(rec)
    meta = {"execution_id": RUN, "workflow_id": "wf"}

    assert queued.data == {"status": "queued", "_metadata": meta}
    assert admitted.data == {"status": "admitted", "_metadata": meta}
    assert start.data == {
        "status": "running",
        "_metadata": meta,
        "payload": {"in": 1},
        "worker_id": "w1",
    }
    assert finish.data == {"status": "completed", "_metadata": meta, "result": {"out": 2}}
    assert {e.topic for e in (queued, finish)} == {f"workflow/wf/{RUN}"}
