"""Submission envelopes for tests: the fields a test cares about, every other one unset.

``schemas.envelope.encode_submission`` takes every field by name (the gateway's
hot path spells them all out); tests name only what they vary.
"""

from __future__ import annotations

from typing import Any

from schemas.envelope import encode_submission


def make_submission(
    *,
    execution_id: str,
    created_at: str,
    project_id: str = "p",
    workflow_id: str = "w",
    deployment_id: str = "v1",
    queue_name: str = "q",
    queue_concurrency_limit: int | None = None,
    concurrency_key: str | None = None,
    run_timeout_seconds: int = 60,
    payload: Any = None,
    initial_state: Any = None,
    session_id: str = "s",
    user_id: str | None = None,
    otel_traceparent: str | None = None,
    parent_execution_id: str | None = None,
    root_execution_id: str | None = None,
    step_key: str | None = None,
    wait_for_subworkflow: bool = False,
    submitted_by: str = "k",
) -> bytes:
    return encode_submission(
        execution_id=execution_id,
        created_at=created_at,
        project_id=project_id,
        workflow_id=workflow_id,
        deployment_id=deployment_id,
        queue_name=queue_name,
        queue_concurrency_limit=queue_concurrency_limit,
        concurrency_key=concurrency_key,
        run_timeout_seconds=run_timeout_seconds,
        payload=payload,
        initial_state=initial_state,
        session_id=session_id,
        user_id=user_id,
        otel_traceparent=otel_traceparent,
        parent_execution_id=parent_execution_id,
        root_execution_id=root_execution_id,
        step_key=step_key,
        wait_for_subworkflow=wait_for_subworkflow,
        submitted_by=submitted_by,
    )
