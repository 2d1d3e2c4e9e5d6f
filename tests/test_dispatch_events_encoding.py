"""The dispatcher's lifecycle events, encoded without a model, decode to the same event."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.dispatch import ErrorInfo, ExecutionStatus, LifecycleEvent, encode_lifecycle_event
from schemas.envelope import SubmissionEnvelope
from tests.envelopes import make_submission

S = ExecutionStatus


def _envelope(key: str | None) -> tuple[SubmissionEnvelope, bytes]:
    raw = make_submission(
        execution_id="x1",
        created_at="2026-12-01T00:00:00Z",
        concurrency_key=key,
        payload={"deep": [{"a": 1}], "big": 2**62},
    )
    return SubmissionEnvelope.model_validate_json(raw), raw


CASES: list[tuple[S, dict[str, Any]]] = [
    (S.ADMITTED, {"dispatch_id": "d1", "with_submission": True}),
    (S.RUNNING, {"dispatch_id": "d1", "worker_id": "w", "started_at": "2026-12-01T00:00:01Z"}),
    (S.COMPLETED, {"dispatch_id": "d1", "worker_id": "w", "result": {"n": [1, 2.5, None, "x"]}}),
    (S.COMPLETED, {"result": 0}),
    (S.FAILED, {"error": ErrorInfo(type="ValueError", message="no"), "attempt": 2}),
    (
        S.RUNNING,
        {
            "error": ErrorInfo(type="E", message="m"),
            "retry_count": 1,
            "retry_at": "2026-12-01T00:00:05Z",
        },
    ),
    (S.DEDUPLICATED, {"duplicate_of": "x0", "with_submission": True, "attempt": 1}),
    (S.CANCELLED, {"cancelled_by": "key-1", "error": ErrorInfo(type="cancelled", message="m")}),
    (S.TIMED_OUT, {"error": ErrorInfo(type="timeout", message="late")}),
]


@pytest.mark.parametrize("key", [None, "k"])
@pytest.mark.parametrize(("status", "fields"), CASES)
@pytest.mark.parametrize("with_raw", [True, False])
def test_an_event_encoded_by_hand_decodes_to_the_model_of_the_same_fields(
    status: S, fields: dict[str, Any], key: str | None, with_raw: bool
) -> None:
    envelope, raw = _envelope(key)
    at = "2026-12-01T00:00:02Z"
    body = encode_lifecycle_event(
        status, envelope, at=at, submission_raw=raw if with_raw else None, **fields
    )
    with_submission = fields.pop("with_submission", False)
    expected = LifecycleEvent(
        status=status,
        execution_id=envelope.execution_id,
        project_id=envelope.project_id,
        workflow_id=envelope.workflow_id,
        deployment_id=envelope.deployment_id,
        queue_name=envelope.queue_name,
        concurrency_key=key,
        at=at,
        submission=envelope if with_submission else None,
        **fields,
    )
    assert LifecycleEvent.model_validate_json(body) == expected
