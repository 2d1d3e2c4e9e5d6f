"""The connected part of a worker: consuming work and cancels, draining.

    polos.work.<project>.<deployment> ──WorkMessage──► on_work
        │ poison (undecodable, another's) → polos.dead (reason), ack
        │ workflow not registered here    → Failed (default retries), ack
        │ this dispatch runs here already → ack, drop   (at-least-once delivery)
        │ finished or cancelled here      → ack, drop
        │ deadline passed                 → ack, drop   (the dispatcher timed it out)
        └ else: the intake (worker._intake) starts it, keeps it waiting for a
          slot, or hands it back; started ones are worker._executions'
    polos.cancel ──(routing key = work queue)──► exclusive queue ──► on_cancel

The connection is robust: aio-pika reopens channels, QoS, the exclusive
cancel queue with its binding, and the consumers after a loss. Deliveries made
on a channel that died cannot be settled any more; the broker requeues them,
so what they carried stops here (see ``worker._executions``).
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
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import DeliveredMessage
from pydantic import ValidationError

from broker.connection import Backoff, Nodes, connect_robust, retry
from broker.errors import BrokerError
from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryWriter, declare_registry
from broker.topology import declare_dead_letters, declare_dispatch_exchanges, declare_work_queue
from schemas.dispatch import decode_cancel, decode_work
from schemas.topology import CANCEL_EXCHANGE, work_queue
from worker._delivery import (
    SETTLE_ERRORS,
    Delivery,
    Handler,
    Received,
    Recent,
    close_quietly,
    flush_settlements,
    settle,
)
from worker._executions import Executions
from worker._reporting import Reporter
from worker._retry import RetryPolicy
from worker._runner import Stop, WorkflowNotRegistered
from worker._work_intake import WorkIntake

log = logging.getLogger("worker")

# After the drain deadline, how long cancelled handlers get to unwind (and
# leased ones to be released) before their deliveries are handed back regardless.
HAND_BACK_GRACE_S = 5.0
# Burst mode: the worker is idle once nothing ran or arrived for this long.
BURST_IDLE_S = 0.5
PUBLISH_CHANNELS = 2
# Workflow names a WorkflowNotRegistered error lists (it is kept in the record).
NAMES_SHOWN = 20

_START_ERRORS = (
    BrokerError,
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


def _names(workflows: Mapping[str, Handler], shown: int = NAMES_SHOWN) -> str:
    """Some of a worker's workflow names, for an error message that stays short."""
    names = sorted(workflows)
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


class Consumer:
    def __init__(
        self,
        *,
        amqp_url: str,
        project: str,
        deployment: str,
        workflows: Mapping[str, Handler],
        retry_policies: Mapping[str, RetryPolicy],
        concurrency: int,
        worker_id: str,
        confirm_timeout: float,
        reconnect_interval: float,
        running_delay: float,
        hold_seconds: float,
        replicas: int | None = None,
        write_linger: float = 0.0,
    ) -> None:
        self._nodes = Nodes.parse(amqp_url)
        self._replicas = replicas
        self._project = project
        self._deployment = deployment
        self._workflows = dict(workflows)
        self._policies = dict(retry_policies)
        self._concurrency = concurrency
        self._worker_id = worker_id
        self._confirm_timeout = confirm_timeout
        self._reconnect_interval = reconnect_interval
        self._running_delay = running_delay
        self._hold_seconds = hold_seconds
        self._write_linger = write_linger
        self.work_queue = work_queue(project, deployment)
        self.cancel_queue = f"polos.cancel.{self.work_queue}.{worker_id}"
        # Cancelled executions (an execution id: any dispatch; a pair: that
        # dispatch): a later delivery of one is dropped. A *new* dispatch of an
        # execution finished here runs again: its owner asked for it.
        self._cancelled = Recent()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._reporter: Reporter | None = None
        self._executions: Executions | None = None
        self._work_channel: AbstractChannel | None = None
        self._intake: WorkIntake | None = None
        self._cancel_channel: AbstractChannel | None = None
        self._stopping = False
        self._hurry = asyncio.Event()
        self._last_arrival = 0.0

    @property
    def running(self) -> frozenset[str]:
        """Execution ids held here: running, or waiting for a slot."""
        ids = {key[0] for key in self._intake.waiting_keys} if self._intake is not None else set()
        if self._executions is not None:
            ids.update(execution.ctx.execution_id for execution in self._executions)
        return frozenset(ids)

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
            write_linger=self._write_linger,
        )
        try:
            await self._setup(connection)
        except BaseException:
            await self._discard_setup()
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

        self._executions = Executions(
            self._publisher,
            self._reporter,
            worker_id=self._worker_id,
            work_queue=self.work_queue,
            running_delay=self._running_delay,
            confirm_timeout=self._confirm_timeout,
            on_ended=self._slot_freed,
            on_leased=self._leased,
        )
        self._executions.start()
        self._work_channel = await connection.channel()
        self._intake = WorkIntake(
            self._work_channel,
            await self._work_channel.declare_queue(self.work_queue, passive=True),
            concurrency=self._concurrency,
            hold_seconds=self._hold_seconds,
            timeout=self._confirm_timeout,
            retry_interval=self._reconnect_interval,
            on_message=self._on_work,
            begin=self._executions.begin,
            check_deliveries=self._executions.check_deliveries,
        )
        self._last_arrival = asyncio.get_running_loop().time()
        await self._intake.start()
        log.info(
            "worker %s consuming %s (concurrency %d; workflows: %s)",
            self._worker_id,
            self.work_queue,
            self._concurrency,
            ", ".join(sorted(self._workflows)),
        )

    async def _discard_setup(self) -> None:
        if self._intake is not None:
            await self._intake.close(0)
            self._intake = None
        if self._executions is not None:
            await self._executions.close()
            self._executions = None

    # -- work -------------------------------------------------------------------

    def _on_work(self, delivered: DeliveredMessage) -> None:
        # Called in the work channel reader's step, in delivery order, without a
        # task (broker.delivery): nothing here awaits; what must (dead-lettering)
        # runs in a task of its own.
        assert self._executions is not None
        assert self._intake is not None
        executions, intake = self._executions, self._intake
        message = Received(delivered)
        now = self._last_arrival = asyncio.get_running_loop().time()
        if self._stopping:
            settle(message, requeue=True)
            return
        try:
            work = decode_work(message.body)
        except ValidationError as exc:
            intake.later(self._poison(message, f"undecodable work message: {exc}"))
            return
        submission = work.submission
        if (submission.project_id, submission.deployment_id) != (self._project, self._deployment):
            intake.later(
                self._poison(
                    message,
                    f"work for {submission.project_id}/{submission.deployment_id} "
                    f"on the queue of {self._project}/{self._deployment}",
                )
            )
            return
        handler = self._workflows.get(submission.workflow_id)
        if handler is None:
            error = WorkflowNotRegistered(
                f"workflow {submission.workflow_id!r} is not registered on worker "
                f"{self._worker_id} of deployment {self._deployment!r} (it registers: "
                f"{_names(self._workflows)})"
            )
            log.error("refusing %s: %s", submission.execution_id, error)
            intake.later(executions.refuse(work, message, error))
            return
        policy = self._policies.get(submission.workflow_id) or RetryPolicy()
        delivery = Delivery(work, message, handler, policy)
        key = delivery.key
        execution_id = key[0]
        held = executions.get(key)
        if held is not None:
            if held.acked or held.delivery_alive:
                log.info("dropping a duplicate delivery of running %s", execution_id)
                settle(message)
                return
            if held.handler_task.done():
                # Its result is decided (no second copy can overlap): this live
                # delivery is the one acknowledged once the result is confirmed.
                held.message = message
                return
            executions.stop(held, Stop.DELIVERY_LOST)
        waiting = intake.waiting(key)
        if waiting is not None:
            if waiting.alive:
                log.info("dropping a duplicate delivery of waiting %s", execution_id)
                settle(message)
                return
            intake.withdraw(key)
        if execution_id in self._cancelled or key in self._cancelled or key in executions.finished:
            log.info("dropping a delivery of %s, finished or cancelled here", execution_id)
            settle(message)
            return
        if work.deadline <= time.time():
            log.info("dropping %s: its deadline passed before it started", execution_id)
            settle(message)
            return
        intake.admit(delivery, now)

    def _slot_freed(self, delivery: Delivery) -> None:
        if self._intake is not None:
            self._intake.ended(delivery)

    def _leased(self, delivery: Delivery) -> None:
        if self._intake is not None:
            self._intake.leased(delivery)

    async def _poison(self, message: Received, reason: str) -> None:
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
        settle(message)

    # -- cancel -------------------------------------------------------------------

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            cancel = decode_cancel(message.body)
        except ValidationError as exc:
            log.warning("ignoring an undecodable cancel message: %s", exc)
            return
        execution_id, dispatch_id = cancel.execution_id, cancel.dispatch_id
        self._cancelled.add(execution_id if dispatch_id is None else (execution_id, dispatch_id))

        def targeted(key: tuple[str, str]) -> bool:
            return key[0] == execution_id and dispatch_id in (None, key[1])

        if self._executions is None or self._intake is None:
            return
        for key in [key for key in self._intake.waiting_keys if targeted(key)]:
            delivery = self._intake.withdraw(key)
            if delivery is not None:
                settle(delivery.message)
        for execution in self._executions:
            if not targeted(execution.key) or execution.handler_task.done():
                continue
            log.info("cancelling %s (%s)", execution_id, cancel.reason)
            if cancel.reason == "superseded":
                self._executions.stop(execution, Stop.SUPERSEDED)
            else:
                self._executions.stop(execution, Stop.CANCEL, cancel_reason=cancel.reason)

    # -- burst, stop ----------------------------------------------------------------

    async def wait_idle(self) -> None:
        """Return once nothing runs, nothing arrived for a while, and the queue is empty."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            executions = self._executions
            if executions is None or executions.supervisors or self.running:
                continue
            last = max(self._last_arrival, executions.last_activity)
            if loop.time() - last < BURST_IDLE_S:
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
        if self._intake is not None:
            await self._intake.stop()
        executions = self._executions
        if executions is not None and executions.supervisors:
            log.info("draining %d executions (up to %ss)", len(executions), drain_timeout)
            waiters = [
                asyncio.create_task(executions.wait()),
                asyncio.create_task(self._hurry.wait()),
            ]
            await asyncio.wait(waiters, timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        if executions is not None:
            await self._hand_back(executions)
        if self._intake is not None:
            await self._intake.close(HAND_BACK_GRACE_S)
        await self._disconnect()

    async def _hand_back(self, executions: Executions) -> None:
        """Past the drain: unacknowledged deliveries go back to the queue, leased
        executions are released (confirmed) so their owner dispatches them at once."""
        for execution in executions:
            executions.stop(execution, Stop.SHUTDOWN)
        # A result the broker cannot take now is not waited for: an unacknowledged
        # delivery goes back to the queue with the channel, a leased one when its
        # lease ends on the owner.
        executions.close_reporting()
        await executions.wait(HAND_BACK_GRACE_S)
        for supervisor in list(executions.supervisors):
            supervisor.cancel()
        await executions.wait(HAND_BACK_GRACE_S)
        await executions.close()

    async def _disconnect(self) -> None:
        # The last acknowledgements and hand-backs go out before the close.
        await flush_settlements()
        for channel in (self._work_channel, self._cancel_channel):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*SETTLE_ERRORS):
                    await channel.close()
        if self._publisher is not None:
            with contextlib.suppress(*SETTLE_ERRORS):
                await self._publisher.close()
        if self._connection is not None:
            await self._connection.close()
