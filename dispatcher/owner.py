"""One submission queue: who owns it, and the consumers of its owner.

Ownership is the results queue's single active consumer. Every dispatcher
whose patterns match a queue consumes its results queue and publishes an
``OwnerProbe`` there; only the active consumer receives anything, so
receiving a delivery means we own the queue::

    STANDBY ──first delivery──► SYNCING ──our probe back──► OWNING ──► STOPPED
      (a probe of ours is out)   (records held, the rest      (the lifecycle runs;
                                  buffered until the probe:    submissions consumed)
                                  all that was queued before
                                  it has been delivered)

The owner holds its newest ledger record at all times, so when it dies the
broker returns it and wakes the next consumer in line. Only the owner consumes
the submission queue, so it can consume again with another prefetch whenever
it likes (a larger limit; too many pending submissions parked in the ledger).

What happens to executions is ``lifecycle.py`` (pure); carrying it out is
``effects.py``. This module only moves deliveries between the broker and them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from broker.deadletter import dead_letter
from broker.errors import BrokerError
from dispatcher.config_wait import ConfigWait
from dispatcher.consumers import CHANNEL_GONE, Consumer, Delivery
from dispatcher.effects import Deliveries, Effector
from dispatcher.lifecycle import MAX_RECORDS_BETWEEN_CHECKPOINTS, QueueLifecycle
from dispatcher.work import Links
from schemas.dispatch import (
    Cancelled,
    CancelRequest,
    Completed,
    Dispatched,
    Failed,
    Heartbeat,
    HeartbeatEntry,
    LedgerRecord,
    OwnerProbe,
    Released,
    Results,
    ResultsQueueMessage,
    Running,
    WorkMessage,
    decode_results_queue,
    encode,
    own_ledger_seq,
)
from schemas.envelope import SubmissionEnvelope, decode_submission
from schemas.registry import DEFAULT_CONCURRENCY_STRATEGY, ConcurrencyStrategy
from schemas.topology import results_queue, submit_queue

log = logging.getLogger(__name__)


# A submission between its delivery and the lifecycle: (delivery ref, envelope,
# body, attempt).
Intake = tuple[int, SubmissionEnvelope, bytes, int]


class OwnerState(StrEnum):
    STANDBY = "standby"
    SYNCING = "syncing"
    OWNING = "owning"
    STOPPED = "stopped"


class QueueOwner:
    def __init__(
        self,
        links: Links,
        project_id: str,
        queue_name: str,
        limit: int | None,
        strategy: ConcurrencyStrategy = DEFAULT_CONCURRENCY_STRATEGY,
    ) -> None:
        self.links = links
        self.settings = links.settings
        self.project_id = project_id
        self.queue_name = queue_name
        self.name = submit_queue(project_id, queue_name)
        self.results_name = results_queue(project_id, queue_name)
        self.state = OwnerState.STANDBY
        self.window = self.settings.window_for(limit, strategy)
        self.lifecycle = QueueLifecycle(
            limit, links.tunables, owner=links.owner_id, strategy=strategy
        )
        self.deliveries = Deliveries()
        self.effector = Effector(
            links,
            self.lifecycle,
            self.deliveries,
            project_id=project_id,
            queue_name=queue_name,
            results_name=self.results_name,
            after_flush=self._after_flush,
        )
        self._results: Consumer | None = None
        self._submissions: Consumer | None = None
        self._submissions_prefetch = 0
        self._intake_busy = False  # a consume/cancel of submissions is under way
        self._nonce = ""
        self._records: list[tuple[int, LedgerRecord]] = []
        self._buffer: list[tuple[Delivery, ResultsQueueMessage]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._config_wait: ConfigWait[Intake] = ConfigWait(self.settings.config_wait_seconds)
        self._config_timer: asyncio.TimerHandle | None = None
        self._config_timeouts_told = 0
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<QueueOwner {self.name} {self.state}>"

    # -- what the session asks -----------------------------------------------------------

    @property
    def held(self) -> int:
        return self.lifecycle.held

    @property
    def limit(self) -> int | None:
        return self.lifecycle.limit

    @property
    def strategy(self) -> ConcurrencyStrategy:
        return self.lifecycle.strategy

    @property
    def owning(self) -> bool:
        """Whether this dispatcher owns the queue (a standby only consumes its results)."""
        return self.state is OwnerState.OWNING

    @property
    def pending(self) -> int:
        """Submissions received and waiting for a slot (or for the registry event
        they name)."""
        return self.lifecycle.pending + len(self._config_wait)

    async def start(self) -> None:
        """Consume the results queue and ask who owns the queue."""
        # Room for the reports of a full window, and for the ledger records held
        # between two checkpoints (each held until the next one is confirmed).
        prefetch = min(2 * self.window + 256 + MAX_RECORDS_BETWEEN_CHECKPOINTS, 65535)
        self._results = await self.links.pool.consume(
            self.results_name,
            kind="results",
            prefetch=prefetch,
            on_message=self._on_result,
            on_cancelled=self._on_gone,
        )
        await self._probe()

    def set_limit(self, limit: int | None) -> None:
        if limit == self.lifecycle.limit:
            return
        log.info("%s: concurrency limit %s -> %s", self.name, self.lifecycle.limit, limit)
        self.window = self.settings.window_for(limit, self.lifecycle.strategy)
        self.lifecycle.set_limit(limit, time.time())
        self._kick()

    def set_strategy(self, strategy: ConcurrencyStrategy) -> None:
        if strategy == self.lifecycle.strategy:
            return
        log.info("%s: concurrency strategy %s -> %s", self.name, self.lifecycle.strategy, strategy)
        self.window = self.settings.window_for(self.lifecycle.limit, strategy)
        self.lifecycle.set_strategy(strategy, time.time())
        self._kick()

    def registry_heard(self) -> None:
        """The registry delivered an event about this queue (applied already): admit
        the submissions that waited for it."""
        if self.state is OwnerState.OWNING and len(self._config_wait):
            now = time.time()
            self._admit(self._config_wait.release(self._heard, now), now)

    def drain(self) -> None:
        """Admit nothing more; what is in flight runs on (ends waiting for a record get
        one now)."""
        self.lifecycle.drain()
        self._kick()

    def stop(self) -> None:
        """Forget everything (the connection is closing, or the queue is gone)."""
        self.state = OwnerState.STOPPED
        self.effector.stop()
        if self._timer is not None:
            self._timer.cancel()
        if self._config_timer is not None:
            self._config_timer.cancel()
        self._config_wait.clear()
        for task in self._tasks:
            task.cancel()
        self.deliveries.clear()
        self._set_busy(False)

    async def wait_tasks(self) -> None:
        await self.effector.wait()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- ownership -----------------------------------------------------------------------

    async def _probe(self) -> None:
        self._nonce = uuid.uuid4().hex
        probe = OwnerProbe(owner=self.links.owner_id, nonce=self._nonce)
        await self.links.publisher.publish(
            self.results_name, encode(probe), message_id=f"probe/{self._nonce}"
        )

    def _on_result(self, delivery: Delivery) -> None:
        self.links.activity()
        if self.state is OwnerState.STOPPED:
            return  # the channel closes with us: the broker takes it back
        if self.state is OwnerState.OWNING:
            lifecycle = self.lifecycle
            seq = own_ledger_seq(delivery.body, self.links.owner_id, lifecycle.epoch)
            if seq is not None:  # one of our records back: held, never decoded
                lifecycle.on_own_record(self.deliveries.hold(delivery), seq)
                self._kick()
                return
        try:
            message = decode_results_queue(delivery.body)
        except ValidationError as exc:
            self._spawn(self.poison(delivery, self.results_name, f"undecodable result: {exc}"))
            return
        if self.state is OwnerState.STANDBY:
            self.state = OwnerState.SYNCING
            log.info("%s: active on its results queue; reading what was left", self.name)
            if not self._is_current_probe(message):
                # Ours may have reached the owner before us; one behind all that is here.
                self._spawn(self._probe_or_fail())
        if self.state is OwnerState.SYNCING:
            self._sync(delivery, message)
        else:
            self._handle(delivery, message)

    def _is_current_probe(self, message: ResultsQueueMessage) -> bool:
        return (
            isinstance(message, OwnerProbe)
            and message.owner == self.links.owner_id
            and message.nonce == self._nonce
        )

    async def _probe_or_fail(self) -> None:
        try:
            await self._probe()
        except BrokerError as exc:
            self.links.fail(exc)

    def _sync(self, delivery: Delivery, message: ResultsQueueMessage) -> None:
        if isinstance(message, LedgerRecord):
            self._records.append((self.deliveries.hold(delivery), message))
        elif isinstance(message, OwnerProbe):
            self._spawn(delivery.ack())
            if self._is_current_probe(message):
                self._take_over()
        else:
            self._buffer.append((delivery, message))

    def _take_over(self) -> None:
        records, self._records = self._records, []
        self.lifecycle.rebuild(records, time.time())
        self.state = OwnerState.OWNING
        log.info(
            "%s: we own it now (%d ledger record(s); %d in flight, %d pending)",
            self.name,
            len(records),
            self.lifecycle.held,
            self.lifecycle.pending,
        )
        buffered, self._buffer = self._buffer, []
        for delivery, message in buffered:
            self._handle(delivery, message)
        self._kick()
        self._spawn(self._consume_submissions(self.window))

    # -- the results queue, while we own it ------------------------------------------------

    def _handle(self, delivery: Delivery, message: ResultsQueueMessage) -> None:
        now = time.time()
        lifecycle = self.lifecycle
        if isinstance(message, OwnerProbe | WorkMessage | Dispatched):
            # A standby's probe, a stale one of ours, or a marker of the old design.
            self._spawn(delivery.ack())
            return
        if isinstance(message, Results):
            # Several reports in one delivery: each settled on its own, the delivery
            # acknowledged once all of them are.
            refs = self.deliveries.hold_shared(delivery, len(message.reports))
            for ref, report in zip(refs, message.reports, strict=True):
                if isinstance(report, Released):
                    lifecycle.on_released(ref, report, now)
                else:
                    lifecycle.on_result(ref, report, now)
            self._kick()
            return
        ref = self.deliveries.hold(delivery)
        if isinstance(message, LedgerRecord):
            if message.owner == self.links.owner_id and message.epoch == lifecycle.epoch:
                lifecycle.on_own_record(ref, message.seq)
            else:
                log.warning("%s: a ledger record of another owner arrived late", self.name)
                self._spawn(self._ack(ref))
                return
        elif isinstance(message, Heartbeat):
            lifecycle.on_heartbeat(ref, message, now)
        elif isinstance(message, Running):
            # A worker of the old design: its running report is a heartbeat.
            entry = HeartbeatEntry(
                execution_id=message.execution_id,
                dispatch_id=message.dispatch_id,
                started_at=message.at,
                redelivered=True,
            )
            heartbeat = Heartbeat(worker_id=message.worker_id, at=message.at, executions=[entry])
            lifecycle.on_heartbeat(ref, heartbeat, now)
        elif isinstance(message, Completed | Failed | Cancelled):
            lifecycle.on_result(ref, message, now)
        elif isinstance(message, Released):
            lifecycle.on_released(ref, message, now)
        else:
            assert isinstance(message, CancelRequest)
            lifecycle.on_cancel_request(ref, message, now)
        self._kick()

    async def _ack(self, ref: int) -> None:
        delivery = self.deliveries.take(ref)
        if delivery is not None:
            await delivery.ack()

    # -- the submission queue --------------------------------------------------------------

    def _on_submission(self, delivery: Delivery) -> None:
        self.links.activity()
        if self.state is not OwnerState.OWNING:
            return  # stopped: the broker takes it back with the channel
        try:
            envelope = decode_submission(delivery.body)
        except ValidationError as exc:
            self._spawn(self.poison(delivery, self.name, f"undecodable submission: {exc}"))
            return
        intake = (self.deliveries.hold(delivery), envelope, delivery.body, delivery.attempt)
        now = time.time()
        config_id = envelope.queue_config_id
        self._admit(self._config_wait.offer(intake, config_id, self._heard, now), now)

    def _heard(self, event_id: str) -> bool:
        return self.links.registry_heard(self.project_id, self.queue_name, event_id)

    def _admit(self, admitted: list[Intake], now: float) -> None:
        """Hand the lifecycle what no longer waits for the registry, in order."""
        for ref, envelope, body, attempt in admitted:
            self.lifecycle.on_submission(ref, envelope, body, attempt, now)
        if admitted:
            self._kick()
        elif len(self._config_wait):
            self._set_busy(True)  # a burst-mode dispatcher must not end meanwhile
        self._arm_config_timer(now)
        wait = self._config_wait
        if wait.timed_out > self._config_timeouts_told:
            self.links.config_timed_out(
                self.project_id, self.queue_name, wait.timed_out - self._config_timeouts_told
            )
            log.warning(
                "%s: %d submission(s) admitted without the registry event they name "
                "(waited %.1fs): decided under the limit and strategy the registry says",
                self.name,
                wait.timed_out - self._config_timeouts_told,
                wait.bound,
            )
            self._config_timeouts_told = wait.timed_out

    def _arm_config_timer(self, now: float) -> None:
        if self._config_timer is not None:
            self._config_timer.cancel()
            self._config_timer = None
        deadline = self._config_wait.deadline()
        if deadline is not None:
            self._config_timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - now), self._on_config_timer
            )

    def _on_config_timer(self) -> None:
        self._config_timer = None
        if self.state is OwnerState.OWNING:
            now = time.time()
            self._admit(self._config_wait.release(self._heard, now), now)

    async def _consume_submissions(self, prefetch: int) -> None:
        self._intake_busy = True
        try:
            if self._submissions is not None:
                await self.links.pool.cancel(self._submissions)
                self._submissions = None
            if prefetch > 0 and self.state is OwnerState.OWNING:
                if not await self.links.queue_exists(self.name):
                    # Deleted (we took over from an owner that let it go for that):
                    # consuming it would close a channel other consumers share.
                    self._on_gone("the queue does not exist")
                    return
                self._submissions = await self.links.pool.consume(
                    self.name,
                    kind="submissions",
                    prefetch=prefetch,
                    on_message=self._on_submission,
                    on_cancelled=self._on_gone,
                )
            self._submissions_prefetch = prefetch if self._submissions is not None else 0
        except (*CHANNEL_GONE, BrokerError) as exc:
            self.links.fail(exc)
        finally:
            self._intake_busy = False

    def _adjust_intake(self) -> None:
        """Consume with the prefetch the window leaves: submissions parked in the ledger
        count against it, so memory never grows with the backlog."""
        if self.state is not OwnerState.OWNING or self._intake_busy:
            return
        parked = self.lifecycle.parked
        want = max(0, self.window - parked)
        current = self._submissions_prefetch
        if want == current:
            return
        if (want < current and parked >= self.window // 2) or want > current:
            if want > current and current and want < current + self.window // 4:
                return  # not worth a new consumer yet
            self._spawn(self._consume_submissions(want))

    # -- driving the lifecycle -------------------------------------------------------------

    def _kick(self) -> None:
        self.effector.kick()

    def _after_flush(self) -> None:
        if self.state is not OwnerState.OWNING:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, self.lifecycle.next_wakeup() - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
        self._adjust_intake()
        self._set_busy(self.lifecycle.busy or bool(len(self._config_wait)))

    def _on_timer(self) -> None:
        self._timer = None
        if self.state is OwnerState.OWNING:
            self.lifecycle.tick(time.time())
            self._kick()

    # -- the rest --------------------------------------------------------------------------

    def _on_gone(self, why: str = "consumer cancelled by the broker (queue deleted)") -> None:
        log.warning("%s: %s; letting it go", self.name, why)
        self.stop()
        self.links.gone(self.project_id, self.queue_name)
        self._tasks.add(asyncio.ensure_future(self._cancel_consumers()))

    async def _cancel_consumers(self) -> None:
        for consumer in (self._results, self._submissions):
            if consumer is not None:
                await self.links.pool.cancel(consumer)
        self._results = self._submissions = None

    async def poison(self, delivery: Delivery, source: str, reason: str) -> None:
        """Keep it once in the dead-letter queue, then drop it: it never loops."""
        log.warning("%s: dead-lettering a message: %s", source, reason[:200])
        try:
            await dead_letter(
                self.links.publisher, delivery.body, source_queue=source, reason=reason
            )
        except BrokerError as exc:
            self.links.fail(exc)
            return
        await delivery.ack()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: background task failed", self.name, exc_info=exc)

    def _set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.links.busy_changed(busy)
