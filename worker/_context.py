"""What a workflow handler learns about the execution it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from schemas.dispatch import WorkMessage
from schemas.envelope import SubmissionEnvelope


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """The first argument of every workflow handler.

    ``submission`` is the envelope exactly as the gateway stamped it; the other
    fields are the ones handlers use most, lifted out of it.
    """

    execution_id: str
    workflow_id: str
    project_id: str
    deployment_id: str
    queue_name: str
    dispatch_id: str
    deadline: float
    """Unix seconds; the run is cancelled at this time."""
    lease_seconds: float
    """How long the owner keeps this dispatch without a heartbeat (the worker renews it)."""
    session_id: str
    user_id: str | None
    initial_state: Any
    parent_execution_id: str | None
    root_execution_id: str | None
    concurrency_key: str | None
    worker_id: str
    redelivered: bool
    """This execution was handed to a worker before: the broker redelivered the work (its
    worker died or lost its link before reporting it), or the dispatcher dispatched it
    again (its lease expired, its worker released it, or its run failed and is retried:
    see ``retry_count``)."""
    submission: SubmissionEnvelope
    retry_count: int = 0
    """Retries before this run (Polos's ``retry_count``): 0 the first time, 1 for the first
    retry of a run that failed, ... (a lease expiry or a redelivery is no retry)."""
    traceparent: str | None = None
    """The W3C traceparent of the submission (its ``traceparent`` header or
    ``otel_traceparent``; with tracing on, the gateway's ``submit`` span), as carried."""

    @property
    def remaining_seconds(self) -> float:
        """Time left until ``deadline`` (negative once it passed)."""
        return self.deadline - time.time()

    @classmethod
    def from_work(cls, work: WorkMessage, *, worker_id: str, redelivered: bool) -> ExecutionContext:
        s = work.submission
        return cls(
            execution_id=s.execution_id,
            workflow_id=s.workflow_id,
            project_id=s.project_id,
            deployment_id=s.deployment_id,
            queue_name=s.queue_name,
            dispatch_id=work.dispatch_id,
            deadline=work.deadline,
            lease_seconds=work.lease_seconds,
            session_id=s.session_id,
            user_id=s.user_id,
            initial_state=s.initial_state,
            parent_execution_id=s.parent_execution_id,
            root_execution_id=s.root_execution_id,
            concurrency_key=s.concurrency_key,
            worker_id=worker_id,
            redelivered=redelivered,
            submission=s,
            retry_count=work.retry_count,
            traceparent=s.otel_traceparent,
        )
