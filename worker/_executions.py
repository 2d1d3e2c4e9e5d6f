"""The executions a worker runs: start, supervise, report, and let go.

    start ─► handler (deadline) ──────────────► Completed | Failed | Cancelled
      │                                          → results queue (confirmed), then ack
      └ still running after running_delay ─► Heartbeat (confirmed) ─► ack: leased
          renewed every lease_seconds / 3 ─── not renewed in time ─► stop, report
                                                 nothing (Released, best effort)

A delivery is acknowledged once a heartbeat carrying its execution is
confirmed, or once its result is, whichever comes first. Until then the
delivery protects the execution: if its channel dies, the broker requeues it
(another worker may start it), so a copy still running here stops at once and
reports nothing. From then on the lease does, and a copy whose lease here ended
stops the same way, before the owner's lease ends and it dispatches again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from broker.errors import BrokerError, Unroutable
from broker.publisher import ConfirmedPublisher
from schemas.dispatch import HeartbeatEntry, WorkMessage
from schemas.ids import now_rfc3339
from worker._context import ExecutionContext
from worker._delivery import Delivery, Received, Recent, settle
from worker._heartbeats import Heartbeats
from worker._reporting import Reporter, ResultBatches
from worker._runner import Execution, Stop, call_with_deadline, outcome, refusal, released

log = logging.getLogger("worker")

# A Released publish that fails is tried again after this long (while stopping,
# until the hand-back grace ends).
RELEASE_RETRY_S = 0.2


class Executions:
    def __init__(
        self,
        publisher: ConfirmedPublisher,
        reporter: Reporter,
        *,
        worker_id: str,
        work_queue: str,
        running_delay: float,
        confirm_timeout: float,
        on_ended: Callable[[Delivery], None],
        on_leased: Callable[[Delivery], None],
    ) -> None:
        self._publisher = publisher
        self._reporter = reporter
        # The results decided in one event-loop round share one message per queue.
        self._results = ResultBatches(reporter, batch_id=worker_id)
        self._worker_id = worker_id
        self._work_queue = work_queue
        self._confirm_timeout = confirm_timeout
        self._on_ended = on_ended
        self._on_leased = on_leased
        self._by_key: dict[tuple[str, str], Execution] = {}
        self.finished = Recent()
        """Dispatches whose result was confirmed here: a later delivery is dropped."""
        self.supervisors: set[asyncio.Task[None]] = set()
        self._chores: set[asyncio.Task[Any]] = set()
        self.last_activity = 0.0
        self._heartbeats: Heartbeats[Execution] = Heartbeats(
            publisher,
            worker_id=worker_id,
            running_delay=running_delay,
            confirm_timeout=confirm_timeout,
            entry=_entry,
            on_reported=self._reported,
            on_expired=self._lease_lost,
        )

    def start(self) -> None:
        self._heartbeats.start()

    async def close(self) -> None:
        await self._heartbeats.close()
        await self._results.close()
        for chore in list(self._chores):
            chore.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)

    def __iter__(self) -> Iterator[Execution]:
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: tuple[str, str]) -> Execution | None:
        return self._by_key.get(key)

    # -- start, supervise -------------------------------------------------------------

    def begin(self, delivery: Delivery) -> None:
        loop = asyncio.get_running_loop()
        work = delivery.work
        ctx = ExecutionContext.from_work(
            work,
            worker_id=self._worker_id,
            redelivered=bool(delivery.message.redelivered) or work.dispatch_count > 1,
        )
        handler_task = asyncio.create_task(
            call_with_deadline(delivery.handler, ctx, work.submission.payload),
            name=f"workflow-{ctx.workflow_id}-{ctx.execution_id}",
        )
        execution = Execution(
            work=work,
            message=delivery.message,
            ctx=ctx,
            delivery=delivery,
            handler_task=handler_task,
            started=loop.time(),
            started_at=now_rfc3339(),
        )
        self._by_key[execution.key] = execution
        self._heartbeats.add(execution, work.results_queue, work.lease_seconds, execution.started)
        supervisor = asyncio.create_task(
            self._supervise(execution), name=f"supervise-{ctx.execution_id}"
        )
        execution.supervisor = supervisor
        self.supervisors.add(supervisor)
        supervisor.add_done_callback(self.supervisors.discard)

    async def refuse(self, work: WorkMessage, message: Received, error: Exception) -> None:
        """Report a dispatch this worker cannot run as failed, without running it, and
        acknowledge its delivery once the report is confirmed: the owner ends the
        execution (its slot free at once) or dispatches it again, as it would a
        failed run."""
        result_id, body = refusal(work, self._worker_id, error)
        try:
            try:
                await self._results.publish(work.results_queue, body, message_id=result_id)
            except Unroutable:
                await self._reporter.dead_letter(
                    message.body,
                    source_queue=self._work_queue,
                    reason=f"{error}; results queue {work.results_queue!r} does not exist",
                    message_id=message.message_id,
                )
        except BrokerError as exc:
            # Stopping while the broker is away: the delivery goes back with the channel.
            log.error("could not report %s: %r", work.submission.execution_id, exc)
            return
        self.finished.add((work.submission.execution_id, work.dispatch_id))
        settle(message)

    async def _supervise(self, execution: Execution) -> None:
        ctx = execution.ctx
        results_queue = execution.work.results_queue
        reported = False
        try:
            try:
                # Awaiting the task itself: cheaper than asyncio.wait (no waiter future,
                # no callbacks to add and remove); its outcome is read from it below.
                await execution.handler_task
            except (Exception, asyncio.CancelledError):
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this supervisor is being cancelled, not (only) the handler
            self._heartbeats.finish(execution)
            self._on_ended(execution.delivery)
            result = outcome(execution)
            if result is None:
                await self._let_go(execution)
                return
            result_id, result_body = result
            # The owner must not see a heartbeat after the result.
            await self._heartbeats.flushed(execution)
            try:
                await self._results.publish(results_queue, result_body, message_id=result_id)
            except Unroutable:
                # The owner's results queue is gone: keep the work, with why,
                # rather than loop it or lose it.
                await self._reporter.dead_letter(
                    execution.message.body,
                    source_queue=self._work_queue,
                    reason=f"results queue {results_queue!r} does not exist",
                    message_id=execution.message.message_id,
                )
            reported = True
            if not execution.acked:
                execution.acked = True
                settle(execution.message)
        except BrokerError as exc:
            # Stopping while the broker is away, or no dead-letter queue to keep
            # the work in: an unacknowledged delivery goes back with the channel.
            log.error("could not report %s: %r", ctx.execution_id, exc)
        except asyncio.CancelledError:
            # Stopping past the drain grace, or the lease ended while reporting.
            execution.handler_task.cancel()
            if not reported and not execution.acked:
                settle(execution.message, requeue=True)
            raise
        finally:
            self._forget(execution)
            if reported:
                self.finished.add(execution.key)

    async def _let_go(self, execution: Execution) -> None:
        """A handler stopped for a reason that reports no result."""
        stop = execution.stop
        log.info("let go of %s (%s)", execution.ctx.execution_id, stop)
        if stop is Stop.SUPERSEDED:
            if not execution.acked:
                # The owner has moved on: a requeued copy would only be cancelled again.
                execution.acked = True
                settle(execution.message)
        elif stop is Stop.LEASE_LOST:
            await self._release(execution, "lease_lost", attempts=1)
        elif stop is Stop.SHUTDOWN:
            if execution.acked:
                await self._release(execution, "shutdown")
            else:
                settle(execution.message, requeue=True)

    async def _release(self, execution: Execution, reason: str, attempts: int = 0) -> None:
        """Publish ``Released`` (confirmed): the owner dispatches again at once instead
        of waiting out the lease. ``attempts`` 0: until cancelled."""
        message_id, body = released(execution, reason)
        tried = 0
        while True:
            tried += 1
            try:
                await self._publisher.publish(
                    execution.work.results_queue, body, message_id=message_id
                )
                return
            except BrokerError as exc:
                log.warning("could not release %s: %r", execution.ctx.execution_id, exc)
                if attempts and tried >= attempts:
                    return
            await asyncio.sleep(RELEASE_RETRY_S)

    def _forget(self, execution: Execution) -> None:
        if self._by_key.get(execution.key) is execution:
            del self._by_key[execution.key]
        self._heartbeats.remove(execution)
        self._on_ended(execution.delivery)
        self.last_activity = asyncio.get_running_loop().time()

    # -- stopping a copy --------------------------------------------------------------

    def stop(self, execution: Execution, stop: Stop, *, cancel_reason: str | None = None) -> None:
        """Stop a running handler; a silent stop lets a new delivery of the same
        dispatch run at once (it is forgotten here now, not when it has unwound)."""
        if execution.handler_task.done():
            return
        execution.stop = stop
        execution.cancel_reason = cancel_reason
        if stop not in (Stop.CANCEL, Stop.SHUTDOWN):
            if self._by_key.get(execution.key) is execution:
                del self._by_key[execution.key]
            self._heartbeats.remove(execution)
        execution.handler_task.cancel()

    def check_deliveries(self) -> bool:
        """Stop every copy whose unacknowledged delivery died with its channel (the
        broker requeued it, another worker may start it); whether some execution
        still depends on its delivery."""
        depends = False
        for execution in self:
            if execution.acked:
                continue
            if not execution.delivery_alive and not execution.handler_task.done():
                log.info("the delivery of %s was lost; stopping it", execution.ctx.execution_id)
                self.stop(execution, Stop.DELIVERY_LOST)
            else:
                depends = True
        return depends

    # -- heartbeat outcomes ------------------------------------------------------------

    def _reported(self, executions: list[Execution]) -> None:
        for execution in executions:
            if execution.acked or execution.stop is not None:
                continue
            execution.acked = True
            self._ack(execution)

    def _ack(self, execution: Execution) -> None:
        if execution.delivery_alive and settle(execution.message):
            self._on_leased(execution.delivery)
            return
        # The ack did not reach the broker: it requeues the delivery.
        execution.acked = False
        self.stop(execution, Stop.DELIVERY_LOST)

    def _lease_lost(self, executions: list[Execution]) -> None:
        for execution in executions:
            if execution.stop in (Stop.LEASE_LOST, Stop.DELIVERY_LOST, Stop.SUPERSEDED):
                continue
            log.warning(
                "lease of %s lost (no heartbeat confirmed in time); stopping it",
                execution.ctx.execution_id,
            )
            if not execution.handler_task.done():
                self.stop(execution, Stop.LEASE_LOST)
            elif execution.supervisor is not None:
                # Its result is still being published: the owner may have
                # dispatched it again by now; give up on it.
                execution.stop = Stop.LEASE_LOST
                execution.supervisor.cancel()
                self._chore(self._release(execution, "lease_lost", attempts=1))

    def _chore(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def close_reporting(self) -> None:
        self._reporter.close()

    async def wait(self, timeout: float | None = None) -> None:
        """Until every supervisor ended (or ``timeout``)."""
        if self.supervisors:
            await asyncio.wait(list(self.supervisors), timeout=timeout)


def _entry(execution: Execution) -> HeartbeatEntry:
    return HeartbeatEntry(
        execution_id=execution.ctx.execution_id,
        dispatch_id=execution.ctx.dispatch_id,
        started_at=execution.started_at,
        redelivered=bool(execution.delivery.message.redelivered),
    )
