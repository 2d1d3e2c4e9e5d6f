"""One execution: the handler under its deadline, and the result it comes to.

The handler runs in a task of its own, so cancelling it (a cancel message, the
drain on shutdown) never interrupts the publishing of a result that is
already decided.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from pydantic_core import PydanticSerializationError

from schemas.dispatch import Cancelled, Completed, ErrorInfo, Failed, Running, WorkMessage, encode
from schemas.ids import now_rfc3339
from schemas.limits import MAX_RESULT_DEPTH, nests_deeper
from worker._context import ExecutionContext

Handler = Callable[[ExecutionContext, Any], Awaitable[Any]]

# Large tracebacks (deep recursion) would bloat the results queue; the tail
# keeps the frames closest to the error.
MAX_TRACEBACK_CHARS = 32_000
TIMEOUT_REASON = "timeout"


class DeadlineExceeded(Exception):
    """The execution's deadline passed while its handler ran."""


@dataclass(eq=False, slots=True)
class Execution:
    """An execution this worker holds, from delivery until its delivery is settled."""

    work: WorkMessage
    message: AbstractIncomingMessage
    """The delivery to settle; a redelivery after a lost channel replaces it."""
    ctx: ExecutionContext
    handler_task: asyncio.Task[Any]
    cancel_reason: str | None = None
    hand_back: bool = False
    supervisor: asyncio.Task[None] | None = field(default=None)

    @property
    def execution_id(self) -> str:
        return self.ctx.execution_id

    @property
    def delivery_alive(self) -> bool:
        """Whether the delivery can still be settled (its channel is open)."""
        try:
            return not self.message.channel.is_closed
        except ChannelInvalidStateError:
            return False


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


def running(ctx: ExecutionContext) -> tuple[str, bytes]:
    message = Running(
        execution_id=ctx.execution_id,
        dispatch_id=ctx.dispatch_id,
        worker_id=ctx.worker_id,
        at=now_rfc3339(),
    )
    return message_id(ctx, "running"), encode(message)


def outcome(execution: Execution) -> tuple[str, bytes] | None:
    """The terminal result (message id, body) of a finished handler task.

    ``None`` when the execution is handed back (the worker is stopping): the
    broker gives it to another worker, so nothing is reported.
    """
    ctx = execution.ctx
    task = execution.handler_task
    at = now_rfc3339()
    common = {"execution_id": ctx.execution_id, "dispatch_id": ctx.dispatch_id, "at": at}
    error: BaseException | None = None
    if task.cancelled():
        if execution.cancel_reason is None and execution.hand_back:
            return None
    else:
        error = task.exception()
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
    failure = Failed(
        worker_id=ctx.worker_id,
        error=error_info(error or asyncio.CancelledError("the workflow cancelled itself")),
        **common,
    )
    return message_id(ctx, "failed"), encode(failure)


def error_info(exc: BaseException) -> ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return ErrorInfo(type=type(exc).__qualname__, message=str(exc), traceback=text)


def message_id(ctx: ExecutionContext, kind: str) -> str:
    # Stable per dispatch and kind: a result published twice (retry after a
    # lost confirm) is recognisably the same message.
    return f"{ctx.execution_id}/{ctx.dispatch_id}/{kind}"
