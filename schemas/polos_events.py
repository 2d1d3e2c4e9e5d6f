"""Polos's event stream (``GET /api/v1/events/stream``): a run's events in Polos's shape.

The Polos orchestrator streams the events of topic
``workflow/<workflow_id>/<run_id>`` as SSE ``data:`` lines, each
``{id, sequence_id, topic, event_type, data, created_at}``; the ``polos-sdk``
(``polos.features.events.stream_workflow``) parses exactly that, resumes with
``last_sequence_id`` (or ``last_timestamp``), and stops at a ``workflow_finish``
whose ``data._metadata.execution_id`` is the run.

Our runs publish no events of their own; their events are the transitions of
the execution's record, one per status it reached, numbered by the order of
the statuses (``SEQUENCE``), so every gateway derives the same events with the
same ids and sequence ids from the same record, and a stream resumes
anywhere without an event log:

    1 queued  → workflow_queued     2 admitted → workflow_admitted
    3 running → workflow_start      4 terminal → workflow_finish (completed),
      workflow_cancel (cancelled), workflow_failed, workflow_timed_out,
      workflow_deduplicated

Polos's own names where Polos has the event (``workflow_start``,
``workflow_finish``, ``workflow_cancel``), ours otherwise. ``data`` always
holds ``status`` and ``_metadata`` (``execution_id``, ``workflow_id``), and what
the transition carries: the payload when it starts, the result, the error,
``duplicate_of``, ``cancelled_by``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, Field

from schemas.dispatch import TERMINAL_STATUSES, ExecutionStatus
from schemas.records import ExecutionRecord

# The order of a run's events; a terminal status is always the last.
SEQUENCE_QUEUED, SEQUENCE_ADMITTED, SEQUENCE_RUNNING, SEQUENCE_TERMINAL = 1, 2, 3, 4

EVENT_TYPES: dict[ExecutionStatus, str] = {
    ExecutionStatus.QUEUED: "workflow_queued",
    ExecutionStatus.ADMITTED: "workflow_admitted",
    ExecutionStatus.RUNNING: "workflow_start",
    ExecutionStatus.COMPLETED: "workflow_finish",
    ExecutionStatus.FAILED: "workflow_failed",
    ExecutionStatus.TIMED_OUT: "workflow_timed_out",
    ExecutionStatus.CANCELLED: "workflow_cancel",
    ExecutionStatus.DEDUPLICATED: "workflow_deduplicated",
}

# Event ids: a name-based UUID of (execution, sequence), the same on every gateway.
_EVENT_NAMESPACE = uuid.UUID("5b0e1c4e-8a0f-4d35-9a4a-1f4c2d7f6e10")


class StreamEvent(BaseModel):
    """One event, field for field what the ``polos-sdk`` ``StreamEvent`` reads."""

    id: str = Field(description="Event ID (a UUID, the same for the same event everywhere)")
    sequence_id: int = Field(description="Its place in the run's events; resume after it")
    topic: str = Field(description="workflow/<workflow_id>/<execution_id>")
    event_type: str
    data: dict[str, Any]
    created_at: str = Field(description="When the transition happened (RFC3339 UTC)")


def topic(workflow_id: str, execution_id: str) -> str:
    return f"workflow/{workflow_id}/{execution_id}"


def run_events(record: ExecutionRecord) -> list[StreamEvent]:
    """Every event of the run that the record shows, in sequence order.

    A transition whose time the record lacks (never reported, or not recorded
    yet) has no event; the record's own status always has its time.
    """
    steps: list[tuple[int, ExecutionStatus, str | None]] = [
        (SEQUENCE_QUEUED, ExecutionStatus.QUEUED, record.created_at),
        (SEQUENCE_ADMITTED, ExecutionStatus.ADMITTED, record.admitted_at),
        (SEQUENCE_RUNNING, ExecutionStatus.RUNNING, record.started_at),
    ]
    if record.status in TERMINAL_STATUSES:
        steps.append((SEQUENCE_TERMINAL, record.status, record.completed_at))
    return [
        _event(record, sequence, status, at) for sequence, status, at in steps if at is not None
    ]


def _event(record: ExecutionRecord, sequence: int, status: ExecutionStatus, at: str) -> StreamEvent:
    data: dict[str, Any] = {
        "status": status.value,
        "_metadata": {"execution_id": record.id, "workflow_id": record.workflow_id},
    }
    if status is ExecutionStatus.RUNNING:
        data["payload"] = record.payload
        if record.worker_id is not None:
            data["worker_id"] = record.worker_id
    elif sequence == SEQUENCE_TERMINAL:
        if status is ExecutionStatus.COMPLETED:
            data["result"] = record.result
        if record.error_details is not None:
            data["error"] = record.error_details.model_dump(mode="json")
        if record.duplicate_of is not None:
            data["duplicate_of"] = record.duplicate_of
        if record.cancelled_by is not None:
            data["cancelled_by"] = record.cancelled_by
    return StreamEvent(
        id=str(uuid.uuid5(_EVENT_NAMESPACE, f"{record.id}/{sequence}")),
        sequence_id=sequence,
        topic=topic(record.workflow_id, record.id),
        event_type=EVENT_TYPES[status],
        data=data,
        created_at=at,
    )
