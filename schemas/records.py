"""What the execution store keeps about one execution, as the status API serves it.

``ExecutionRecord`` is the body of ``GET /api/v1/executions/{id}``: the field
names of the Polos orchestrator's ``ExecutionResponse`` (what the ``polos-sdk``
``ExecutionHandle.get()`` reads), with our richer states and a few fields Polos
has no counterpart for (``duplicate_of``, ``admitted_at``, ``worker_id``,
``error_details``, ``attempt_errors``). ``retry_count`` is Polos's.

Polos sends ``error`` as a string; so do we (``"<type>: <message>"``), and the
structured error the worker reported (with its traceback) is in
``error_details``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.dispatch import ErrorInfo, ExecutionStatus


class AttemptError(BaseModel):
    """One failed run of an execution (``ExecutionRecord.attempt_errors``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    attempt: int = Field(description="1 for the first run, 2 for the first retry, ...")
    error: str = Field(description='"<type>: <message>", as ``error`` is')
    error_details: ErrorInfo
    at: str = Field(description="When the dispatcher took the failure (RFC3339 UTC)")
    retry_at: str | None = Field(
        default=None, description="When the next run was due; absent for the last one"
    )
    worker_id: str | None = None


class ExecutionRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(description="Execution ID (UUIDv7)")
    workflow_id: str
    status: ExecutionStatus
    payload: Any = None
    result: Any = None
    error: str | None = Field(default=None, description='"<type>: <message>", as Polos sends it')
    error_details: ErrorInfo | None = None
    created_at: str = Field(description="RFC3339 UTC; from the submission, else from the id")
    admitted_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = Field(
        default=None, description="When the execution became terminal (any terminal status)"
    )
    deployment_id: str | None = None
    queue_name: str | None = None
    concurrency_key: str | None = None
    session_id: str | None = None
    user_id: str | None = None
    run_timeout_seconds: int | None = None
    cancelled_at: str | None = None
    cancelled_by: str | None = None
    parent_execution_id: str | None = None
    root_execution_id: str | None = None
    step_key: str | None = None
    project_id: str
    duplicate_of: str | None = Field(
        default=None, description="For a deduplicated execution: the one holding its key"
    )
    worker_id: str | None = None
    retry_count: int = Field(
        default=0,
        description="Retries of the run so far, as Polos counts them: 0 while the first "
        "run goes; a retry counts from the moment it is decided",
    )
    attempt_errors: list[AttemptError] = Field(
        default_factory=list, description="Each failed run's error, in order"
    )


class WorkflowRunsResponse(BaseModel):
    """``GET /api/v1/workflows/{workflow_id}/runs``: newest first."""

    executions: list[ExecutionRecord]
    next_cursor: str | None = Field(
        default=None, description="Pass as ?cursor= for the next page; absent on the last one"
    )
