"""What comes back on a queue's results queue, and what the owner does with it::

dispatched  ours, back from the queue ────────► kept unacked beside its submission
            of a redelivered submission ──────► in flight: it keeps its slot, is not
                                                dispatched again, deadline from the marker
            of a submission not seen (yet) ───► orphan: counted against the limit,
                                                dropped after a grace
running     ─► ``running`` event, ack (a redelivered submission: now known in flight)
completed | failed | cancelled
            ─► terminal: slot and key free, event, ack submission, marker, result
anything for an unknown or finished execution ─► ack and ignore
undecodable ─► dead-lettered once
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dispatcher.admission import Execution, Marker, Orphan, Phase, TerminalResult
from dispatcher.consumers import Delivery
from schemas.dispatch import (
    Completed,
    Dispatched,
    ErrorInfo,
    ExecutionStatus,
    Failed,
    Running,
    WorkMessage,
    decode_results_queue,
)
from schemas.topology import work_queue

if TYPE_CHECKING:
    from dispatcher.owner import QueueOwner


class ResultsHandler:
    def __init__(self, owner: QueueOwner) -> None:
        self._owner = owner
        self._gate = owner.gate

    def handle(self, delivery: Delivery) -> None:
        owner = self._owner
        try:
            message = decode_results_queue(delivery.body)
        except ValidationError as exc:
            owner.spawn(owner.poison(delivery, owner.results_name, f"undecodable result: {exc}"))
            return
        if isinstance(message, WorkMessage):
            marker = Marker(message.submission.execution_id, message.dispatch_id, message.deadline)
            self._on_marker(delivery, marker)
        elif isinstance(message, Dispatched):
            self._on_marker(
                delivery, Marker(message.execution_id, message.dispatch_id, message.deadline)
            )
        elif isinstance(message, Running):
            self._on_running(delivery, message)
        else:
            self._on_terminal(delivery, message)

    def adopt(self, execution: Execution, orphan: Orphan) -> None:
        """The submission of an orphan marker arrived: it is in flight."""
        if orphan.timer is not None:
            orphan.timer.cancel()
        self._take_marker(execution, orphan.marker, orphan.message)
        if orphan.result is not None:
            delivery, message = orphan.result
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
        envelope = execution.envelope
        execution.work_queue = work_queue(envelope.project_id, envelope.deployment_id)
        self._owner.runs.arm_deadline(execution)

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
        owner.spawn(self._report_running(execution, delivery, message))

    async def _report_running(
        self, execution: Execution, delivery: Delivery, message: Running
    ) -> None:
        if execution.announced is not None:
            await execution.announced.wait()
        await self._owner.links.notifier.event(
            ExecutionStatus.RUNNING,
            execution.envelope,
            dispatch_id=message.dispatch_id,
            worker_id=message.worker_id,
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
