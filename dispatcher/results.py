"""What comes back on a queue's results queue, and what the owner does with it::

dispatched  ours, back from the queue ────────► kept unacked beside its submission
            of a redelivered submission ──────► in flight: it keeps its slot, is not
                                                dispatched again, deadline from the marker
            of a submission not seen (yet) ───► orphan: counted against the limit,
                                                dropped after a grace
running     ─► ``running`` event, ack (a redelivered submission: now known in flight)
completed | failed | cancelled
            ─► terminal: slot and key free, event, ack submission, marker, result
cancel_request (a user's, from the gateway)
            of a held execution ───────────────► cancel to its workers, ``cancelled``:
                                                slot and key free, ack submission, marker,
                                                then the request
            of a pending one (not admitted) ──► ``cancelled`` at once, never runs
            of one not seen (yet) ────────────► kept unacked until its submission
                                                reaches the head (then ``cancelled``
                                                without running), or a wait passes
            of a finished one ────────────────► ack
anything for an unknown or finished execution ─► ack and ignore
undecodable ─► dead-lettered once
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dispatcher.admission import Execution, Marker, Orphan, Phase, TerminalResult
from dispatcher.consumers import Delivery
from dispatcher.runs import user_cancel
from schemas.dispatch import (
    CancelRequest,
    Completed,
    Dispatched,
    ErrorInfo,
    ExecutionStatus,
    Failed,
    Running,
    WorkMessage,
    decode_results_queue,
)
from schemas.ids import now_rfc3339
from schemas.topology import work_queue

if TYPE_CHECKING:
    from dispatcher.owner import QueueOwner

log = logging.getLogger(__name__)

# Of the results consumer's prefetch, the share cancel requests may hold unacked
# while they wait for their submissions: markers and results need the rest.
CANCEL_REQUEST_SHARE = 4


@dataclass(slots=True, eq=False)
class WantedCancel:
    """A cancel request for an execution this owner has not seen (yet)."""

    request: CancelRequest
    # Unacknowledged, so an owner taking over finds it; None once acknowledged
    # early (too many were held: see ``CANCEL_REQUEST_SHARE``).
    delivery: Delivery | None
    timer: asyncio.TimerHandle | None = None


class ResultsHandler:
    def __init__(self, owner: QueueOwner) -> None:
        self._owner = owner
        self._gate = owner.gate
        self.cancels: dict[str, WantedCancel] = {}

    def handle(self, delivery: Delivery) -> None:
        owner = self._owner
        try:
            message = decode_results_queue(delivery.body)
        except ValidationError as exc:
            owner.spawn(owner.poison(delivery, owner.results_name, f"undecodable result: {exc}"))
            return
        if isinstance(message, WorkMessage):
            marker = Marker(
                message.submission.execution_id,
                message.dispatch_id,
                message.deadline,
                message.attempt,
            )
            self._on_marker(delivery, marker)
        elif isinstance(message, Dispatched):
            marker = Marker(
                message.execution_id, message.dispatch_id, message.deadline, message.attempt
            )
            self._on_marker(delivery, marker)
        elif isinstance(message, Running):
            self._on_running(delivery, message)
        elif isinstance(message, CancelRequest):
            self._on_cancel_request(delivery, message)
        else:
            self._on_terminal(delivery, message)

    def adopt(self, execution: Execution, orphan: Orphan) -> None:
        """The submission of an orphan marker arrived: it is in flight."""
        if orphan.timer is not None:
            orphan.timer.cancel()
        self._take_marker(execution, orphan.marker, orphan.message)
        if orphan.result is not None:
            delivery, message = orphan.result
            if execution.phase is Phase.TERMINAL:  # cancelled on request meanwhile
                self._owner.spawn(delivery.ack())
            else:
                self._terminal(execution, delivery, message)

    # -- markers ---------------------------------------------------------------------

    def _on_marker(self, delivery: Delivery, marker: Marker) -> None:
        owner, gate = self._owner, self._gate
        execution = gate.find(marker.execution_id)
        if execution is None:
            if owner.runs.is_recent(marker.execution_id) or marker.execution_id in gate.orphans:
                owner.spawn(delivery.ack())
                return
            orphan = Orphan(delivery, marker)
            orphan.timer = owner.loop.call_later(
                owner.settings.dispatcher_orphan_marker_grace_seconds,
                self._orphan_expired,
                marker.execution_id,
                orphan,
            )
            gate.orphans[marker.execution_id] = orphan
            return
        if execution.phase in (Phase.PENDING, Phase.RECOVERING):
            self._take_marker(execution, delivery, marker)
        elif execution.marker is None and execution.dispatch_id == marker.dispatch_id:
            execution.marker = delivery  # ours, back from the queue (or one a worker reported)
            if execution.deadline != marker.deadline:
                execution.deadline = marker.deadline
                owner.runs.arm_deadline(execution)
        else:
            # A marker of an earlier dispatch of an execution dispatched again.
            owner.spawn(delivery.ack())

    def _take_marker(self, execution: Execution, delivery: Delivery, marker: Marker) -> None:
        self._gate.mark_in_flight(execution)
        execution.marker = delivery
        execution.dispatch_id = marker.dispatch_id
        execution.deadline = marker.deadline
        # It runs as admitted then: its events continue that decision's record.
        execution.attempt = marker.attempt
        envelope = execution.envelope
        execution.work_queue = work_queue(envelope.project_id, envelope.deployment_id)
        self._owner.runs.arm_deadline(execution)
        self._cancel_if_wanted(execution)

    def _orphan_expired(self, execution_id: str, orphan: Orphan) -> None:
        owner, gate = self._owner, self._gate
        if gate.orphans.get(execution_id) is not orphan:
            return
        del gate.orphans[execution_id]
        owner.spawn(orphan.marker.ack())
        if orphan.result is not None:
            owner.spawn(orphan.result[0].ack())
        owner.pump()

    # -- reports from workers --------------------------------------------------------

    def _on_running(self, delivery: Delivery, message: Running) -> None:
        owner = self._owner
        execution = self._gate.find(message.execution_id)
        if execution is None or execution.phase is Phase.TERMINAL:
            owner.spawn(delivery.ack())
            return
        if execution.phase in (Phase.PENDING, Phase.RECOVERING):
            # A worker has it: in flight, though its marker is not here yet.
            self._gate.mark_in_flight(execution)
            envelope = execution.envelope
            execution.dispatch_id = message.dispatch_id
            execution.work_queue = work_queue(envelope.project_id, envelope.deployment_id)
            execution.deadline = time.time() + envelope.run_timeout_seconds
            owner.runs.arm_deadline(execution)
            if self._cancel_if_wanted(execution):
                owner.spawn(delivery.ack())
                return
        # Stamped now: the event may go out after the terminal one is stamped (both
        # wait for ``admitted``), and ``started_at`` must not come after ``completed_at``.
        at = now_rfc3339()
        owner.spawn(self._report_running(execution, delivery, message, at))

    async def _report_running(
        self, execution: Execution, delivery: Delivery, message: Running, at: str
    ) -> None:
        if execution.announced is not None:
            await execution.announced.wait()
        await self._owner.links.notifier.event(
            ExecutionStatus.RUNNING,
            execution.envelope,
            dispatch_id=message.dispatch_id,
            worker_id=message.worker_id,
            at=at,
            attempt=execution.attempt,
        )
        await delivery.ack()

    def _on_terminal(self, delivery: Delivery, message: TerminalResult) -> None:
        execution = self._gate.find(message.execution_id)
        if execution is None:
            orphan = self._gate.orphans.get(message.execution_id)
            if orphan is not None and orphan.result is None:
                orphan.result = (delivery, message)  # settled when its submission arrives
                return
            self._owner.spawn(delivery.ack())
            return
        self._terminal(execution, delivery, message)

    def _terminal(self, execution: Execution, delivery: Delivery, message: TerminalResult) -> None:
        if isinstance(message, Completed):
            status, result, error = ExecutionStatus.COMPLETED, message.result, None
        elif isinstance(message, Failed):
            status, result, error = ExecutionStatus.FAILED, None, message.error
        elif message.reason == "timeout":
            # The worker enforces the same deadline and may report it first.
            status, result = ExecutionStatus.TIMED_OUT, None
            error = ErrorInfo(type="timeout", message="the worker stopped it at its deadline")
        else:
            status, result = ExecutionStatus.CANCELLED, None
            error = ErrorInfo(type="cancelled", message=message.reason)
        self._owner.runs.finish(
            execution,
            status,
            result_delivery=delivery,
            worker_id=message.worker_id,
            dispatch_id=message.dispatch_id,
            result=result,
            error=error,
        )

    # -- cancel requests -------------------------------------------------------------

    def _on_cancel_request(self, delivery: Delivery, request: CancelRequest) -> None:
        owner, gate = self._owner, self._gate
        execution_id = request.execution_id
        execution = gate.find(execution_id)
        if execution is None:
            execution = next((e for e in gate.pending if e.execution_id == execution_id), None)
        if execution is not None and execution.phase is not Phase.TERMINAL:
            self._cancel(execution, delivery, request)
            return
        if (
            execution is not None
            or owner.runs.is_recent(execution_id)
            or (execution_id in self.cancels)
        ):
            owner.spawn(delivery.ack())  # over already, or asked twice
            return
        # Not seen: still in the broker (the gateway saw it queued), or over long
        # ago, or its submission is on its way to us after a takeover.
        settings = owner.settings
        if request.seen_status in (None, ExecutionStatus.QUEUED):
            wait = settings.dispatcher_cancel_queued_wait_seconds
        else:
            wait = settings.dispatcher_cancel_unknown_wait_seconds
        wanted = WantedCancel(request, delivery)
        limit = max(8, min(2 * owner.window + 64, 65535) // CANCEL_REQUEST_SHARE)
        if sum(1 for w in self.cancels.values() if w.delivery is not None) >= limit:
            log.warning(
                "%s: %d cancel requests wait for their submissions; the request for %s is "
                "kept in memory only (lost if another dispatcher takes the queue over)",
                owner.name,
                limit,
                execution_id,
            )
            owner.spawn(delivery.ack())
            wanted.delivery = None
        wanted.timer = owner.loop.call_later(wait, self._cancel_expired, execution_id, wanted)
        self.cancels[execution_id] = wanted

    def take_cancel(self, execution_id: str) -> WantedCancel | None:
        """The waiting cancel request of ``execution_id``, now in the caller's hands."""
        wanted = self.cancels.pop(execution_id, None)
        if wanted is not None and wanted.timer is not None:
            wanted.timer.cancel()
        return wanted

    def _cancel_if_wanted(self, execution: Execution) -> bool:
        """An execution just found in flight that someone asked to cancel: cancel it."""
        wanted = self.take_cancel(execution.execution_id)
        if wanted is None:
            return False
        self._cancel(execution, wanted.delivery, wanted.request)
        return True

    def _cancel(
        self, execution: Execution, delivery: Delivery | None, request: CancelRequest
    ) -> None:
        # A first delivery still pending was never dispatched: nobody to tell.
        # Anything else may run on a worker (a redelivery may have been
        # dispatched by an owner that is gone).
        never_dispatched = execution.phase is Phase.PENDING and execution.recover_until is None
        log.info(
            "%s: %s cancelled by %s", self._owner.name, execution.execution_id, request.requested_by
        )
        self._owner.runs.finish(
            execution,
            ExecutionStatus.CANCELLED,
            result_delivery=delivery,
            error=user_cancel(request.requested_by),
            cancel=not never_dispatched,
            cancel_reason="user",
            cancelled_by=request.requested_by,
        )

    def _cancel_expired(self, execution_id: str, wanted: WantedCancel) -> None:
        if self.cancels.get(execution_id) is not wanted:
            return
        del self.cancels[execution_id]
        if wanted.delivery is not None:
            self._owner.spawn(wanted.delivery.ack())
