"""The submission envelope: what the gateway publishes to a submission queue.

The gateway stamps it (execution id, creation time, resolved deployment, the
defaults applied) so that nothing downstream needs the HTTP request again.
``encode_submission`` is the hot path's encoder; ``SubmissionEnvelope`` is the
decoder every consumer uses and the reference the encoder is tested against.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class SubmissionEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["submission"] = "submission"
    schema_version: int = SCHEMA_VERSION
    execution_id: str
    created_at: str
    project_id: str
    workflow_id: str
    deployment_id: str
    queue_name: str
    queue_concurrency_limit: int | None = None
    # Carried as the client sent it (the gateway checked it): what the queue does
    # with the key is the registry's strategy, which the submission set if it
    # carried one. A string, not the Literal: a newer gateway's value must not
    # make this envelope undecodable for an older dispatcher or worker.
    concurrency_strategy: str | None = None
    concurrency_key: str | None = None
    # The registry event that set the limit or strategy this submission carries
    # (absent when it carries neither): its dispatcher admits it only once it has
    # read that event, or after POLOS_DISPATCHER_CONFIG_WAIT_SECONDS.
    queue_config_id: str | None = None
    run_timeout_seconds: int
    payload: Any = None
    initial_state: Any = None
    session_id: str
    user_id: str | None = None
    otel_traceparent: str | None = None
    parent_execution_id: str | None = None
    root_execution_id: str | None = None
    step_key: str | None = None
    wait_for_subworkflow: bool = False
    submitted_by: str


def encode_submission(
    *,
    execution_id: str,
    created_at: str,
    project_id: str,
    workflow_id: str,
    deployment_id: str,
    queue_name: str,
    queue_concurrency_limit: int | None,
    concurrency_key: str | None,
    run_timeout_seconds: int,
    payload: Any,
    initial_state: Any,
    session_id: str,
    user_id: str | None,
    otel_traceparent: str | None,
    parent_execution_id: str | None,
    root_execution_id: str | None,
    step_key: str | None,
    wait_for_subworkflow: bool,
    submitted_by: str,
    concurrency_strategy: str | None = None,
) -> bytes:
    """Serialize an envelope without building a model (the submit hot path)."""
    envelope: dict[str, Any] = {
        "type": "submission",
        "schema_version": SCHEMA_VERSION,
        "execution_id": execution_id,
        "created_at": created_at,
        "project_id": project_id,
        "workflow_id": workflow_id,
        "deployment_id": deployment_id,
        "queue_name": queue_name,
        "queue_concurrency_limit": queue_concurrency_limit,
        "concurrency_key": concurrency_key,
        "run_timeout_seconds": run_timeout_seconds,
        "payload": payload,
        "initial_state": initial_state,
        "session_id": session_id,
        "user_id": user_id,
        "otel_traceparent": otel_traceparent,
        "parent_execution_id": parent_execution_id,
        "root_execution_id": root_execution_id,
        "step_key": step_key,
        "wait_for_subworkflow": wait_for_subworkflow,
        "submitted_by": submitted_by,
    }
    if concurrency_strategy is not None:  # absent otherwise: envelopes stay as they were
        envelope["concurrency_strategy"] = concurrency_strategy
    return orjson.dumps(envelope)


def with_queue_config(envelope: bytes, config_id: str) -> bytes:
    """``envelope`` (``encode_submission``'s: an object) naming the registry event
    ``config_id``, without decoding it again."""
    assert envelope.endswith(b"}")
    return b'%s,"queue_config_id":%s}' % (envelope[:-1], orjson.dumps(config_id))


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
    """``encode_submission`` with every field a caller does not name unset (tests
    and benchmarks; the gateway's hot path names them all)."""
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


def decode_submission(raw: bytes) -> SubmissionEnvelope:
    return SubmissionEnvelope.model_validate_json(raw)
