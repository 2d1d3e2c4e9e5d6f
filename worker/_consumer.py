"""The connected part of a worker: consuming work and cancels, running, draining.

    polos.work.<project>.<deployment> ──WorkMessage──► on_work ──► Execution
        │ poison                 → polos.dead (reason), ack
        │ already running here   → ack, drop        (at-least-once delivery)
        │ recently finished here → ack, drop
        │ deadline passed        → ack, drop        (the dispatcher timed it out)
        └ else: Running ─► handler (deadline) ─► Completed | Failed | Cancelled
                → results queue (confirmed) → then ack the work message
    polos.cancel ──(routing key = work queue)──► exclusive queue ──► on_cancel

The connection is robust: aio-pika reopens channels, QoS, the exclusive
cancel queue with its binding, and both consumers after a loss. Deliveries
made on a channel that died cannot be settled any more; the broker requeues
them, and a redelivery of an execution still running here is adopted (its
delivery is the one acknowledged after the result) instead of run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError
from pydantic import ValidationError

from broker.connection import Backoff, Nodes, connect_robust, retry
from broker.errors import BrokerError, Unroutable
from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryWriter, declare_registry
from broker.topology import declare_dead_letters, declare_dispatch_exchanges, declare_work_queue
from schemas.dispatch import WorkMessage, decode_cancel, decode_work
from schemas.topology import CANCEL_EXCHANGE, work_queue
from worker._context import ExecutionContext
from worker._delivery import SETTLE_ERRORS, Recent, close_quietly, settle
from worker._reporting import Reporter
from worker._runner import Execution, Handler, call_with_deadline, outcome, running

log = logging.getLogger("worker")

# After the drain deadline, how long cancelled handlers get to unwind before
# their deliveries are handed back regardless.
HAND_BACK_GRACE_S = 5.0
# Burst mode: the worker is idle once nothing ran or arrived for this long.
BURST_IDLE_S = 0.5
PUBLISH_CHANNELS = 2

_START_ERRORS = (
    BrokerError,
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


class Consumer:
    def __init__(
        self,
        *,
        amqp_url: str,
        project: str,
        deployment: str,
        workflows: Mapping[str, Handler],
        concurrency: int,
        worker_id: str,
        confirm_timeout: float,
        reconnect_interval: float,
        replicas: int | None = None,
    ) -> None:
        self._nodes = Nodes.parse(amqp_url)
        self._replicas = replicas
        self._project = project
        self._deployment = deployment
        self._workflows = dict(workflows)
        self._concurrency = concurrency
        self._worker_id = worker_id
        self._confirm_timeout = confirm_timeout
        self._reconnect_interval = reconnect_interval
        self.work_queue = work_queue(project, deployment)
        self.cancel_queue = f"polos.cancel.{self.work_queue}.{worker_id}"
        self.running: dict[str, Execution] = {}
        # Cancelled executions (any dispatch) and finished dispatches: a later
        # delivery of one is dropped. A *new* dispatch of an execution finished
        # here runs again: its owner asked for it (e.g. it never got the result).
        self._cancelled = Recent()
        self._finished = Recent()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._reporter: Reporter | None = None
        self._work_channel: AbstractChannel | None = None
        self._work: AbstractQueue | None = None
        self._work_tag: str | None = None
        self._cancel_channel: AbstractChannel | None = None
        self._supervisors: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._hurry = asyncio.Event()
        self._last_activity = 0.0

    # -- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register and consume; retries until the broker answers."""
        await retry(
            self._start_once,
            what="starting on the broker",
            backoff=Backoff(self._reconnect_interval),
            retry_on=lambda exc: isinstance(exc, _START_ERRORS),
        )

    async def _start_once(self) -> None:
        connection = await connect_robust(
            self._nodes,
            f"worker-{self._project}-{self._deployment}",
            max_backoff=self._reconnect_interval,
        )
        try:
            await self._setup(connection)
        except BaseException:
            await close_quietly(connection)
            raise
        self._connection = connection

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        self._publisher = ConfirmedPublisher(
            connection, confirm_timeout=self._confirm_timeout, channels=PUBLISH_CHANNELS
        )
        await self._publisher.start()
        self._reporter = Reporter(self._publisher, max_backoff=self._reconnect_interval)
        await declare_dead_letters(connection, replicas=self._replicas)
        await declare_registry(connection, replicas=self._replicas)
        async with connection.channel() as channel:
            await declare_dispatch_exchanges(channel)
        await declare_work_queue(connection, self.work_queue, replicas=self._replicas)
        await RegistryWriter(self._publisher).register_deployment(
            self._project, self._deployment, sorted(self._workflows)
        )

        # Cancels first: no execution may start before its cancel can reach us.
        self._cancel_channel = await connection.channel()
        cancels = await self._cancel_channel.declare_queue(
            self.cancel_queue, exclusive=True, auto_delete=True
        )
        await cancels.bind(CANCEL_EXCHANGE, routing_key=self.work_queue)
        await cancels.consume(self._on_cancel, no_ack=True)

        self._work_channel = await connection.channel()
        await self._work_channel.set_qos(prefetch_count=self._concurrency)
        self._work = await self._work_channel.declare_queue(self.work_queue, passive=True)
        self._last_activity = asyncio.get_running_loop().time()
        self._work_tag = await self._work.consume(self._on_work)
        log.info(
            "worker %s consuming %s (concurrency %d; workflows: %s)",
            self._worker_id,
            self.work_queue,
            self._concurrency,
            ", ".join(sorted(self._workflows)),
        )

    # -- work -------------------------------------------------------------------

    async def _on_work(self, message: AbstractIncomingMessage) -> None:
        # No await before the execution is recorded: deliveries are handled in
        # concurrent tasks, and a duplicate must see the first one.
        self._last_activity = asyncio.get_running_loop().time()
        if self._stopping:
            await settle(message, requeue=True)
            return
        try:
            work = decode_work(message.body)
        except ValidationError as exc:
            await self._poison(message, f"undecodable work message: {exc}")
            return
        submission = work.submission
        if (submission.project_id, submission.deployment_id) != (self._project, self._deployment):
            await self._poison(
                message,
                f"work for {submission.project_id}/{submission.deployment_id} "
                f"on the queue of {self._project}/{self._deployment}",
            )
            return
        handler = self._workflows.get(submission.workflow_id)
        if handler is None:
            await self._poison(
                message,
                f"unknown workflow {submission.workflow_id!r} in deployment {self._deployment!r}",
            )
            return
        execution_id = submission.execution_id
        held = self.running.get(execution_id)
        if held is not None:
            if held.delivery_alive:
                log.info("dropping a duplicate delivery of running %s", execution_id)
                await settle(message)
            else:
                log.info("adopting the redelivery of running %s", execution_id)
                held.message = message
            return
        if execution_id in self._cancelled or (execution_id, work.dispatch_id) in self._finished:
            log.info("dropping a delivery of %s, finished or cancelled here", execution_id)
            await settle(message)
            return
        if work.deadline <= time.time():
            log.info("dropping %s: its deadline passed before it started", execution_id)
            await settle(message)
            return
        self._begin(work, message, handler)

    def _begin(self, work: WorkMessage, message: AbstractIncomingMessage, handler: Handler) -> None:
        ctx = ExecutionContext.from_work(
            work, worker_id=self._worker_id, redelivered=bool(message.redelivered)
        )
        handler_task = asyncio.create_task(
            call_with_deadline(handler, ctx, work.submission.payload),
            name=f"workflow-{ctx.workflow_id}-{ctx.execution_id}",
        )
        execution = Execution(work=work, message=message, ctx=ctx, handler_task=handler_task)
        self.running[ctx.execution_id] = execution
        supervisor = asyncio.create_task(
            self._supervise(execution), name=f"supervise-{ctx.execution_id}"
        )
        execution.supervisor = supervisor
        self._supervisors.add(supervisor)
        supervisor.add_done_callback(self._supervisors.discard)

    async def _supervise(self, execution: Execution) -> None:
        assert self._reporter is not None
        reporter = self._reporter
        ctx = execution.ctx
        results_queue = execution.work.results_queue
        # Running goes out while the handler already runs; the terminal result
        # waits for it, so the owner never sees them out of order.
        running_id, running_body = running(ctx)
        announce = asyncio.create_task(
            reporter.publish(results_queue, running_body, message_id=running_id)
        )
        reported = False
        try:
            await asyncio.wait([execution.handler_task])
            result = outcome(execution)
            if result is None:
                announce.cancel()
                log.info("handing back %s", ctx.execution_id)
                await settle(execution.message, requeue=True)
                return
            result_id, result_body = result
            try:
                with contextlib.suppress(Unroutable):
                    await announce
                await reporter.publish(results_queue, result_body, message_id=result_id)
            except Unroutable:
                # The owner's results queue is gone: keep the work, with why,
                # rather than loop it or lose it.
                await reporter.dead_letter(
                    execution.message.body,
                    source_queue=self.work_queue,
                    reason=f"results queue {results_queue!r} does not exist",
                    message_id=execution.message.message_id,
                )
            reported = True
            await settle(execution.message)
        except BrokerError as exc:
            # Stopping while the broker is away, or no dead-letter queue to keep
            # the work in: the delivery goes back to the queue with the channel.
            log.error("could not report %s: %r", ctx.execution_id, exc)
        except asyncio.CancelledError:
            # Stopping past the drain grace: whatever was not reported is redone.
            announce.cancel()
            execution.handler_task.cancel()
            if not reported:
                await settle(execution.message, requeue=True)
            raise
        finally:
            self.running.pop(ctx.execution_id, None)
            if reported:
                self._finished.add((ctx.execution_id, ctx.dispatch_id))
            self._last_activity = asyncio.get_running_loop().time()

    async def _poison(self, message: AbstractIncomingMessage, reason: str) -> None:
        assert self._reporter is not None
        log.error("dead-lettering a message from %s: %s", self.work_queue, reason)
        try:
            await self._reporter.dead_letter(
                message.body,
                source_queue=self.work_queue,
                reason=reason,
                message_id=message.message_id,
            )
        except BrokerError as exc:
            # Stopping, or no dead-letter queue: leave it unsettled; the broker
            # takes it back with the channel.
            log.error("could not dead-letter a message from %s: %r", self.work_queue, exc)
            return
        await settle(message)

    # -- cancel -------------------------------------------------------------------

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            cancel = decode_cancel(message.body)
        except ValidationError as exc:
            log.warning("ignoring an undecodable cancel message: %s", exc)
            return
        self._cancelled.add(cancel.execution_id)
        execution = self.running.get(cancel.execution_id)
        if execution is None or execution.handler_task.done():
            return
        log.info("cancelling %s (%s)", cancel.execution_id, cancel.reason)
        execution.cancel_reason = cancel.reason
        execution.handler_task.cancel()

    # -- burst, stop ----------------------------------------------------------------

    async def wait_idle(self) -> None:
        """Return once nothing runs, nothing arrived for a while, and the queue is empty."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            if self.running or loop.time() - self._last_activity < BURST_IDLE_S:
                continue
            if await self._work_queue_empty():
                return

    async def _work_queue_empty(self) -> bool:
        if self._connection is None:
            return False
        try:
            async with self._connection.channel() as channel:
                queue = await channel.declare_queue(self.work_queue, passive=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            return False
        return not queue.declaration_result.message_count

    def hurry(self) -> None:
        """End the drain now (a second SIGTERM): hand back what still runs."""
        self._hurry.set()

    async def stop(self, drain_timeout: float) -> None:
        """Stop taking work, drain, hand back the rest, and disconnect."""
        self._stopping = True
        if self._work is not None and self._work_tag is not None:
            with contextlib.suppress(*SETTLE_ERRORS, BrokerError, TimeoutError):
                await self._work.cancel(self._work_tag, timeout=self._confirm_timeout)
        if self._supervisors:
            log.info("draining %d executions (up to %ss)", len(self._supervisors), drain_timeout)
            waiters = [
                asyncio.create_task(self._drained()),
                asyncio.create_task(self._hurry.wait()),
            ]
            await asyncio.wait(waiters, timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        await self._hand_back()
        await self._disconnect()

    async def _drained(self) -> None:
        while self._supervisors:
            await asyncio.wait(list(self._supervisors))

    async def _hand_back(self) -> None:
        for execution in list(self.running.values()):
            execution.hand_back = True
            execution.handler_task.cancel()
        # Past the drain deadline a result the broker cannot take now is not
        # waited for: its delivery goes back to the queue with the channel.
        if self._reporter is not None:
            self._reporter.close()
        if self._supervisors:
            await asyncio.wait(list(self._supervisors), timeout=HAND_BACK_GRACE_S)
        for supervisor in list(self._supervisors):
            supervisor.cancel()
        if self._supervisors:
            await asyncio.wait(list(self._supervisors), timeout=HAND_BACK_GRACE_S)

    async def _disconnect(self) -> None:
        for channel in (self._work_channel, self._cancel_channel):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*SETTLE_ERRORS):
                    await channel.close()
        if self._publisher is not None:
            with contextlib.suppress(*SETTLE_ERRORS):
                await self._publisher.close()
        if self._connection is not None:
            await self._connection.close()
