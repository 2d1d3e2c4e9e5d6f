"""HTTP wire format of the Polos Orchestrator submit operation (``submit_workflow``).

Field for field the OpenAPI ``SubmitWorkflowRequest`` / ``SubmitWorkflowResponse``
(``spec/submit-workflow.openapi.yaml``), with DESIGN §2's rules as constraints.
Unknown fields are ignored: the Polos SDK sends ``batch_id``, ``channel_context``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.dispatch import ExecutionStatus
from schemas.registry import ConcurrencyStrategy

INT32_MAX = 2**31 - 1
QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
# Visible ASCII: a key travels in an HTTP header and in a Redis key name.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
DEFAULT_RUN_TIMEOUT_SECONDS = 3600

QueueName = Annotated[str, Field(pattern=QUEUE_NAME_PATTERN, min_length=1, max_length=128)]


class SubmitWorkflowRequest(BaseModel):
    """Request to submit a workflow for execution."""

    # strict: "5" is not an int and 1 is not a string; the API is typed, not guessed.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    payload: Any = Field(description="Input payload for the workflow (any JSON, null allowed)")
    # "" names a deployment like any other string (an unknown one: 404), not "the latest".
    deployment_id: str | None = Field(default=None, max_length=255)
    queue_name: QueueName | None = None
    queue_concurrency_limit: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # Our extension (Polos ignores unknown fields): like the limit, it sets the
    # queue's strategy (latest wins) when present.
    concurrency_strategy: ConcurrencyStrategy | None = Field(
        default=None,
        description="What the queue does with concurrency_key: deduplicate (the default), "
        "partition (the limit applies per key) or cancel_in_progress (a newer execution "
        "cancels the older one with its key). Sets the queue's strategy, as "
        "queue_concurrency_limit sets its limit",
    )
    concurrency_key: str | None = Field(
        default=None,
        max_length=255,
        description="Concurrency key (at most 255 characters): deduplicates, partitions or "
        "cancels by the queue's concurrency_strategy; an empty string is no key",
    )
    run_timeout_seconds: int | None = Field(default=None, ge=1, le=INT32_MAX)
    initial_state: Any = None
    session_id: str | None = None
    user_id: str | None = None
    otel_traceparent: str | None = None
    parent_execution_id: str | None = None
    root_execution_id: str | None = None
    step_key: str | None = None
    wait_for_subworkflow: bool | None = None
    # The pass-through fields (session_id .. step_key) have no length limit of
    # their own: DESIGN §2 carries them unchanged, and the body limit bounds them.

    @field_validator("concurrency_key")
    @classmethod
    def _empty_key_is_no_key(cls, value: str | None) -> str | None:
        return value or None


class SubmitWorkflowResponse(BaseModel):
    """Response after submitting a workflow."""

    execution_id: str = Field(description="Execution ID (UUIDv7)")
    created_at: str = Field(description="Creation timestamp (RFC3339, UTC)")


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error the gateway answers with."""

    error: str
    error_type: str
    details: list[ErrorDetail] = Field(default_factory=list)


# -- batch submit (``POST /api/v1/workflows/batch_run``) ------------------------------


class BatchWorkflowItem(SubmitWorkflowRequest):
    """One workflow of a batch: a single submit's fields, plus which workflow.

    Fields left out take the batch's value (``deployment_id``, ``session_id``,
    ``user_id``, ``otel_traceparent``, ``parent_execution_id``,
    ``root_execution_id``, ``step_key``, ``wait_for_subworkflow``).
    """

    workflow_id: str = Field(min_length=1, max_length=255)
    # Our extension (Polos ignores unknown fields): this item's own idempotency key.
    idempotency_key: str | None = Field(
        default=None,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Idempotency key of this item (1-255 visible ASCII characters); "
        "overrides the batch's Idempotency-Key header for it",
    )


class BatchRunRequest(BaseModel):
    """The Polos batch submit: several workflows, validated and accepted as a whole."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    workflows: list[BatchWorkflowItem]
    # "" names a deployment like any other string (an unknown one: 404), not "the latest".
    deployment_id: str | None = Field(default=None, max_length=255)
    session_id: str | None = None
    user_id: str | None = None
    otel_traceparent: str | None = None
    parent_execution_id: str | None = None
    root_execution_id: str | None = None
    step_key: str | None = None
    wait_for_subworkflow: bool | None = None


class BatchRunResponse(BaseModel):
    """One entry per requested workflow, in request order."""

    executions: list[SubmitWorkflowResponse]


class CancelExecutionResponse(BaseModel):
    """``POST /api/v1/executions/{execution_id}/cancel``.

    200: ``status`` is ``cancelled``. 202: the request is with the execution's
    dispatcher, ``status`` is what the execution is now (``cancelled_at`` null);
    poll the execution for the outcome.
    """

    execution_id: str
    status: ExecutionStatus
    cancelled_at: str | None = None


# -- process probes (``GET /health``, ``GET /ready``) ----------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadinessResponse(BaseModel):
    """200 ``{"status": "ready"}``; 503 ``not_ready`` with what is missing."""

    status: Literal["ready", "not_ready"]
    broker_connected: bool | None = None
    registry_replayed: bool | None = None
