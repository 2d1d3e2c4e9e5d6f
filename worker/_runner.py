"""One execution: the handler under its deadline, and the result it comes to.

The handler runs in a task of its own, so cancelling it (a cancel message, the
drain on shutdown) never interrupts the publishing of a result that is
already decided.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from pydantic_core import PydanticSerializationError

from schemas.dispatch import (
    Cancelled,
    Completed,
    ErrorInfo,
    Failed,
    Released,
    WorkMessage,
    encode,
)
from schemas.ids import now_rfc3339
from schemas.limits import MAX_RESULT_DEPTH, nests_deeper
from worker._context import ExecutionContext
from worker._delivery import Delivery, Handler, Received
from worker._retry import RetryPolicy

# Large tracebacks (deep recursion) would bloat the results queue; the tail
# keeps the frames closest to the error.
MAX_TRACEBACK_CHARS = 32_000
TIMEOUT_REASON = "timeout"


class DeadlineExceeded(Exception):
    """The execution's deadline passed while its handler ran."""


class WorkflowNotRegistered(Exception):
    """Work for a workflow this worker does not register: a rolling deploy under one
    deployment id, or a worker started without it. Reported as the run's failure
    (retried by the default policy, perhaps on a worker that has it), never run."""


class Stop(StrEnum):
    """Why the worker stopped a handler before it ended by itself."""

    CANCEL = "cancel"
    """A cancel message (user, timeout): it reports ``Cancelled``."""
    SUPERSEDED = "superseded"
    """The owner moved on to another dispatch: it reports nothing."""
    LEASE_LOST = "lease_lost"
    """Its lease here ended unrenewed: it reports nothing (a ``Released``, best effort)."""
    DELIVERY_LOST = "delivery_lost"
    """Its unacknowledged delivery went back to the queue with a dead channel: nothing."""
    SHUTDOWN = "shutdown"
    """Stopping past the drain: requeued, or (leased) a ``Released``."""


SILENT = frozenset({Stop.SUPERSEDED, Stop.LEASE_LOST, Stop.DELIVERY_LOST})


@dataclass(eq=False, slots=True)
class Execution:
    """A dispatch this worker runs, from its start until it is settled."""

    work: WorkMessage
    message: Received
    """The delivery to settle; a redelivery after a lost channel may replace it once the
    handler is done (the result is decided: no second copy can overlap)."""
    ctx: ExecutionContext
    delivery: Delivery
    """Its slot in the intake."""
    handler_task: asyncio.Task[Any]
    started: float
    """Monotonic (loop) time the handler started."""
    started_at: str
    acked: bool = False
    """The delivery is acknowledged: from then on the lease protects the execution."""
    stop: Stop | None = None
    cancel_reason: str | None = None
    supervisor: asyncio.Task[None] | None = field(default=None)

    @property
    def key(self) -> tuple[str, str]:
        return (self.ctx.execution_id, self.ctx.dispatch_id)

    @property
    def delivery_alive(self) -> bool:
        return self.message.alive


async def call_with_deadline(handler: Handler, ctx: ExecutionContext, payload: Any) -> Any:
    loop = asyncio.get_running_loop()
    when = loop.time() + (ctx.deadline - time.time())
    scope = asyncio.timeout_at(when)
    try:
        async with scope:
            return await handler(ctx, payload)
    except TimeoutError:
        if scope.expired():
            raise DeadlineExceeded(f"deadline passed after {ctx.workflow_id!r} started") from None
        raise


def released(execution: Execution, reason: str) -> tuple[str, bytes]:
    ctx = execution.ctx
    message = Released(
        execution_id=ctx.execution_id,
        dispatch_id=ctx.dispatch_id,
        worker_id=ctx.worker_id,
        at=now_rfc3339(),
        reason=reason,
    )
    return message_id(ctx, f"released-{reason}"), encode(message)


def refusal(work: WorkMessage, worker_id: str, error: Exception) -> tuple[str, bytes]:
    """The ``Failed`` report (message id, body) of a dispatch this worker cannot run.

    Nothing started, so it carries no ``started_at``; the default retry policy
    decides whether another run is wanted (the workflow's own is unknown here).
    """
    execution_id = work.submission.execution_id
    failure = Failed(
        execution_id=execution_id,
        dispatch_id=work.dispatch_id,
        worker_id=worker_id,
        at=now_rfc3339(),
        error=ErrorInfo(type=type(error).__qualname__, message=str(error)),
        retry_in=RetryPolicy().retry_in(work.retry_count, error),
    )
    return report_id(execution_id, work.dispatch_id, "failed"), encode(failure)


def outcome(execution: Execution) -> tuple[str, bytes] | None:
    """The terminal result (message id, body) of a finished handler task.

    ``None`` when the worker stopped it for a reason that reports nothing (see
    ``Stop``): the execution is run again elsewhere, or the owner moved on.
    """
    ctx = execution.ctx
    task = execution.handler_task
    at = now_rfc3339()
    common: dict[str, Any] = {
        "execution_id": ctx.execution_id,
        "dispatch_id": ctx.dispatch_id,
        "at": at,
        "started_at": execution.started_at,
    }
    error: BaseException | None = None
    # Only what the handler raised may be retried: a result it returned that
    # cannot be sent would fail the same way again.
    raised = False
    if execution.stop in SILENT:
        # Even if the handler ignored its cancellation and returned: another copy
        # may run by now, or the owner no longer has this dispatch.
        return None
    if task.cancelled():
        if execution.stop is Stop.SHUTDOWN:
            return None
    else:
        error = task.exception()
        raised = error is not None
        if error is None:
            try:
                completed = Completed(worker_id=ctx.worker_id, result=task.result(), **common)
                data = completed.model_dump(mode="json")
                body = orjson.dumps(data)
            except (PydanticSerializationError, TypeError, ValueError) as exc:
                error = TypeError(
                    f"the result of {ctx.workflow_id!r} is not JSON-serializable: {exc}"
                )
                error.__cause__ = exc
            else:
                brackets = body.count(b"{") + body.count(b"[")
                if brackets <= MAX_RESULT_DEPTH or not nests_deeper(
                    data["result"], MAX_RESULT_DEPTH
                ):
                    return message_id(ctx, "completed"), body
                # The owner would refuse to decode it: the run would end timed_out.
                error = ValueError(
                    f"the result of {ctx.workflow_id!r} nests deeper than {MAX_RESULT_DEPTH} "
                    "levels of arrays and objects"
                )
    if execution.cancel_reason is not None:
        reason = execution.cancel_reason
    elif isinstance(error, DeadlineExceeded):
        reason = TIMEOUT_REASON
    else:
        reason = None
    if reason is not None:
        body = encode(Cancelled(worker_id=ctx.worker_id, reason=reason, **common))
        return message_id(ctx, "cancelled"), body
    error = error or asyncio.CancelledError("the workflow cancelled itself")
    retry_in = execution.delivery.policy.retry_in(ctx.retry_count, error) if raised else None
    failure = Failed(worker_id=ctx.worker_id, error=error_info(error), retry_in=retry_in, **common)
    return message_id(ctx, "failed"), encode(failure)


def error_info(exc: BaseException) -> ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return ErrorInfo(type=type(exc).__qualname__, message=str(exc), traceback=text)


def message_id(ctx: ExecutionContext, kind: str) -> str:
    return report_id(ctx.execution_id, ctx.dispatch_id, kind)


def report_id(execution_id: str, dispatch_id: str, kind: str) -> str:
    # Stable per dispatch and kind: a result published twice (retry after a
    # lost confirm) is recognisably the same message.
    return f"{execution_id}/{dispatch_id}/{kind}"
