"""An execution from admission to its end: dispatch, deadline, settlement.

    admit ──► one publish: work to the deployment's work queue + a copy to the
              results queue (the marker) ──► ``admitted`` event
    deadline (timer) ──► ``timed_out``, a cancel to the deployment's workers
    finish ──► slot and key free at once ──► event ──► ack submission, marker, result

A duplicate is settled the same way without ever running: ``deduplicated``
event, then its submission is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal

from broker.errors import BrokerError
from dispatcher.admission import Execution, Phase
from dispatcher.consumers import Delivery
from schemas.dispatch import ErrorInfo, ExecutionStatus, encode_work
from schemas.topology import work_queue

if TYPE_CHECKING:
    from dispatcher.owner import QueueOwner

log = logging.getLogger(__name__)

# Terminal execution ids remembered per queue, so a late marker or result of one is
# settled at once (not kept as an orphan).
RECENT_TERMINAL = 512


class Runs:
    def __init__(self, owner: QueueOwner) -> None:
        self._owner = owner
        self._recent: OrderedDict[str, None] = OrderedDict()

    def deduplicate(self, execution: Execution, holder: str) -> None:
        self.remember(execution.execution_id)
        # A cancel asked for before it got here: it never runs either way.
        wanted = self._owner.results.take_cancel(execution.execution_id)
        request = wanted.delivery if wanted is not None else None
        self._owner.spawn(self._settle_duplicate(execution, holder, request))

    async def _settle_duplicate(
        self, execution: Execution, holder: str, request: Delivery | None
    ) -> None:
        await self._owner.links.notifier.event(
            ExecutionStatus.DEDUPLICATED,
            execution.envelope,
            duplicate_of=holder,
            with_submission=True,
            attempt=execution.attempt,
        )
        await execution.submission.ack()
        if request is not None:
            await request.ack()

    def admit(self, execution: Execution) -> None:
        wanted = self._owner.results.take_cancel(execution.execution_id)
        if wanted is not None:
            # Cancelled while it waited in the broker: it ends here, at the head of
            # its queue, without running (its slot is free again for the next one).
            self.finish(
                execution,
                ExecutionStatus.CANCELLED,
                result_delivery=wanted.delivery,
                error=user_cancel(wanted.request.requested_by),
                cancelled_by=wanted.request.requested_by,
                pump=False,
            )
            return
        envelope = execution.envelope
        execution.dispatch_id = uuid.uuid4().hex
        execution.deadline = time.time() + envelope.run_timeout_seconds
        execution.work_queue = work_queue(envelope.project_id, envelope.deployment_id)
        execution.announced = asyncio.Event()
        self.arm_deadline(execution)
        self._owner.spawn(self._dispatch(execution))

    async def _dispatch(self, execution: Execution) -> None:
        assert execution.announced is not None
        try:
            await self._dispatch_and_announce(execution)
        finally:
            # Whatever happened, later events of it (its settlement) must not wait
            # forever for an ``admitted`` that will never come.
            execution.announced.set()

    async def _dispatch_and_announce(self, execution: Execution) -> None:
        assert execution.dispatch_id is not None
        assert execution.deadline is not None
        try:
            work = encode_work(
                dispatch_id=execution.dispatch_id,
                deadline=execution.deadline,
                results_queue=self._owner.results_name,
                submission_raw=execution.raw,
                attempt=execution.attempt,
            )
            # One publish: the work to the work queue, and a copy of it to the
            # results queue as our marker (BCC). The broker stores both or neither,
            # so a successor finds the marker of any work that is out (and does not
            # dispatch it again), and never a marker without work.
            await self._owner.links.work_queues.publish(
                self._owner.links.dispatch.pick(execution.execution_id),
                execution.work_queue,
                work,
                message_id=execution.dispatch_id,
                copy_to=self._owner.results_name,
            )
        except BrokerError as exc:
            if execution.phase is not Phase.TERMINAL:
                log.error(
                    "%s: dispatch of %s failed: %s", self._owner.name, execution.execution_id, exc
                )
                self._owner.links.fail(exc)
            return
        except Exception as exc:
            # Not the broker: this work cannot be sent at all (e.g. a name AMQP
            # cannot carry). Failing the session would requeue it to fail the same
            # way on every redelivery (resetting the whole dispatcher each time),
            # so it ends here, failed, with the reason in its event: accepted,
            # accounted for, acknowledged, never silently lost. The publish had not
            # reached the broker (its frame could not be built), so no run races it.
            if execution.phase is not Phase.TERMINAL:
                log.exception("%s: cannot dispatch %s", self._owner.name, execution.execution_id)
                self.finish(
                    execution,
                    ExecutionStatus.FAILED,
                    error=ErrorInfo(
                        type="dispatch_error",
                        message=f"cannot dispatch: {type(exc).__name__}: {exc}",
                    ),
                )
            return
        await self._owner.links.notifier.event(
            ExecutionStatus.ADMITTED,
            execution.envelope,
            dispatch_id=execution.dispatch_id,
            with_submission=True,
            attempt=execution.attempt,
        )

    def arm_deadline(self, execution: Execution) -> None:
        if execution.timer is not None:
            execution.timer.cancel()
        assert execution.deadline is not None
        delay = max(0.0, execution.deadline - time.time())
        execution.timer = self._owner.loop.call_later(delay, self._deadline_passed, execution)

    def _deadline_passed(self, execution: Execution) -> None:
        execution.timer = None
        if execution.phase not in (Phase.DISPATCHING, Phase.IN_FLIGHT):
            return
        timeout = execution.envelope.run_timeout_seconds
        self.finish(
            execution,
            ExecutionStatus.TIMED_OUT,
            error=ErrorInfo(type="timeout", message=f"not finished within {timeout}s"),
            cancel=True,
        )

    def finish(
        self,
        execution: Execution,
        status: ExecutionStatus,
        *,
        result_delivery: Delivery | None = None,
        worker_id: str | None = None,
        dispatch_id: str | None = None,
        result: Any = None,
        error: ErrorInfo | None = None,
        cancel: bool = False,
        cancel_reason: Literal["timeout", "user"] = "timeout",
        cancelled_by: str | None = None,
        pump: bool = True,
    ) -> None:
        """Terminal: free slot and key now, tell, then acknowledge (submission first).

        ``cancel`` tells the deployment's workers to stop it; ``pump=False`` when
        the caller is the owner's pump itself.
        """
        if execution.timer is not None:
            execution.timer.cancel()
            execution.timer = None
        if cancel and not execution.work_queue:
            envelope = execution.envelope
            execution.work_queue = work_queue(envelope.project_id, envelope.deployment_id)
        self._owner.gate.finish(execution)
        self.remember(execution.execution_id)
        self._owner.spawn(
            self._settle(
                execution,
                status,
                result_delivery,
                worker_id,
                dispatch_id,
                result,
                error,
                cancel_reason if cancel else None,
                cancelled_by,
            )
        )
        if pump:
            self._owner.pump()

    async def _settle(
        self,
        execution: Execution,
        status: ExecutionStatus,
        result_delivery: Delivery | None,
        worker_id: str | None,
        dispatch_id: str | None,
        result: Any,
        error: ErrorInfo | None,
        cancel: Literal["timeout", "user"] | None,
        cancelled_by: str | None,
    ) -> None:
        notifier = self._owner.links.notifier
        if execution.announced is not None:
            await execution.announced.wait()
        if cancel is not None and execution.work_queue:
            await notifier.cancel(execution.execution_id, execution.work_queue, cancel)
        await notifier.event(
            status,
            execution.envelope,
            dispatch_id=dispatch_id or execution.dispatch_id,
            worker_id=worker_id,
            result=result,
            error=error,
            cancelled_by=cancelled_by,
            attempt=execution.attempt,
        )
        # Submission first: a crash after it leaves at worst an orphan marker, which
        # the next owner drops; the other way round it would dispatch again.
        await execution.submission.ack()
        if execution.marker is not None:
            await execution.marker.ack()
        if result_delivery is not None:
            await result_delivery.ack()

    def remember(self, execution_id: str) -> None:
        self._recent[execution_id] = None
        if len(self._recent) > RECENT_TERMINAL:
            self._recent.popitem(last=False)

    def is_recent(self, execution_id: str) -> bool:
        return execution_id in self._recent


def user_cancel(requested_by: str) -> ErrorInfo:
    return ErrorInfo(type="cancelled", message=f"cancelled on request of {requested_by}")
