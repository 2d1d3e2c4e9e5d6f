"""Carrying out what a queue's lifecycle decided, one flush at a time, in phases.

    1. the flush's ledger record, to the queue's results queue (confirmed)
    2. work to the work queues, cancels, lifecycle events (confirmed)
    3. acknowledgements (and the lifecycle hears of the confirmed checkpoint)

A terminal event is confirmed before anything records or settles the end: once
it is, the lifecycle puts the end (a tombstone) in the next flush's record, and
the deliveries it settles are acknowledged behind that record. An event the
broker does not take ends the session with nothing of its flush acknowledged.

Flushes never overlap: whatever the lifecycle decided while one ran goes into
the next. That keeps every acknowledgement behind what makes it safe, and it
means only the work of a dead owner's *last* record may be unsent (see
``dispatcher/lifecycle.py``). A broker failure ends the session (the broker
takes back everything held; the next owner rebuilds from the ledger).

This module knows the lifecycle's effects and the broker links, nothing of the
queue owner's consumers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from broker.errors import BrokerError
from dispatcher.consumers import Delivery
from dispatcher.lifecycle import Ack, Dispatch, Emit, Execution, QueueLifecycle, SendCancel
from dispatcher.work import Links
from schemas.dispatch import encode_work
from schemas.envelope import SubmissionEnvelope
from schemas.topology import work_queue

log = logging.getLogger(__name__)


class _Shared:
    """One delivery that carries several reports (a worker's ``Results``)."""

    __slots__ = ("delivery", "left")

    def __init__(self, delivery: Delivery, left: int) -> None:
        self.delivery = delivery
        self.left = left


class Deliveries:
    """The deliveries an owner holds, by the handle its lifecycle knows them by.

    A delivery that carries several reports is held once per report
    (``hold_shared``): the lifecycle settles each report on its own, and the
    delivery is handed back for its acknowledgement when the last one is.
    """

    def __init__(self) -> None:
        self._held: dict[int, Delivery | _Shared] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, delivery: Delivery) -> int:
        self._next += 1
        self._held[self._next] = delivery
        return self._next

    def hold_shared(self, delivery: Delivery, count: int) -> range:
        """``count`` handles of one delivery (at least one)."""
        shared = _Shared(delivery, count)
        first = self._next + 1
        self._next += count
        held = self._held
        for ref in range(first, self._next + 1):
            held[ref] = shared
        return range(first, self._next + 1)

    def take(self, ref: int) -> Delivery | None:
        """The delivery, once nothing else holds it (``None`` while others do)."""
        held = self._held.pop(ref, None)
        if isinstance(held, _Shared):
            held.left -= 1
            return held.delivery if held.left == 0 else None
        return held

    def clear(self) -> None:
        self._held.clear()


class Effector:
    def __init__(
        self,
        links: Links,
        lifecycle: QueueLifecycle,
        deliveries: Deliveries,
        *,
        project_id: str,
        queue_name: str,
        results_name: str,
        after_flush: Callable[[], None],
    ) -> None:
        self._links = links
        self._lifecycle = lifecycle
        self._deliveries = deliveries
        self._project_id = project_id
        self._queue_name = queue_name
        self._results_name = results_name
        self._after_flush = after_flush
        self._task: asyncio.Task[None] | None = None
        self._acking: set[asyncio.Task[None]] = set()
        self._stopped = False

    @property
    def flushing(self) -> bool:
        return self._task is not None or bool(self._acking)

    def kick(self) -> None:
        """Something may be due: start a flush unless one runs (it loops until idle)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        self._stopped = True
        for task in [self._task, *self._acking]:
            if task is not None:
                task.cancel()

    async def wait(self) -> None:
        """Until no flush runs and nothing waits to be announced or acknowledged (an
        announcement starts the flush that records the ends, and so on)."""
        while tasks := [t for t in [self._task, *self._acking] if t is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        try:
            while not self._stopped and await self._flush():
                pass
        except BrokerError as exc:
            log.error("%s/%s: a flush failed: %s", self._project_id, self._queue_name, exc)
            self._links.fail(exc)
        except Exception as exc:
            log.exception("%s/%s: a flush failed", self._project_id, self._queue_name)
            self._links.fail(exc)
        finally:
            self._task = None
        if not self._stopped:
            self._after_flush()

    async def _flush(self) -> bool:
        lifecycle = self._lifecycle
        effects = lifecycle.take_effects()
        write = lifecycle.take_ledger(time.time())
        if write is None and not effects:
            return False
        if write is not None:
            await self._links.publisher.publish(
                self._results_name,
                write.body,
                message_id=f"{lifecycle.owner}/{lifecycle.epoch}/{write.seq}",
            )
            self._links.ledger_written(
                self._project_id, self._queue_name, write.checkpoint, len(write.body)
            )
            effects += lifecycle.on_ledger_written(write)
        # Work and cancels before the next flush: its record may name what follows
        # from them. Events are awaited only by this flush's acknowledgements (a
        # terminal event goes out before its submission is let go); the next flush
        # does not wait for them (the Notifier lingers to batch them).
        events = [e for e in effects if isinstance(e, Emit)]
        sends = [e for e in effects if isinstance(e, Dispatch | SendCancel)]
        acks = [e for e in effects if isinstance(e, Ack)]
        if len(sends) == 1:
            await self._send(sends[0])  # the usual case below saturation: no task for it
        elif sends:
            await asyncio.gather(*(self._send(e) for e in sends))
        if events:
            # Into their batches now, in order; awaited as the few batches they make.
            batches = {f for f in map(self._post, events) if f is not None}
            self._spawn(self._announce_then_ack(events, batches, acks))
        else:
            await self._ack(acks)
        return True

    async def _announce_then_ack(
        self, events: list[Emit], batches: set[asyncio.Future[None]], acks: list[Ack]
    ) -> None:
        try:
            if batches:
                # wait(), not gather(): a batch's future is shared, never cancelled here.
                await asyncio.wait(batches)
            for batch in batches:
                batch.result()  # raises BrokerError if the broker did not take it
        except BrokerError as exc:
            # Nothing these events settle is let go: the session ends, the broker
            # takes the deliveries back, and the next owner (which finds these
            # executions in the ledger as they were) hears of them again.
            log.error("%s/%s: events not published: %s", self._project_id, self._queue_name, exc)
            self._links.fail(exc)
            return
        self._lifecycle.on_announced((e.execution for e in events if e.terminal), time.time())
        await self._ack(acks)
        self.kick()  # the ends are recorded by a next flush (or wait a moment for one)

    async def _ack(self, acks: list[Ack]) -> None:
        for effect in acks:
            delivery = self._deliveries.take(effect.ref)
            if delivery is not None:
                await delivery.ack()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._acking.add(task)
        task.add_done_callback(self._acked)

    def _acked(self, task: asyncio.Task[None]) -> None:
        self._acking.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: announcing or acknowledging failed", self._results_name, exc_info=exc)

    async def _send(self, effect: Dispatch | SendCancel) -> None:
        if isinstance(effect, Dispatch):
            await self._dispatch(effect)
        else:
            x = effect.execution
            if not x.deployment_id:
                return  # an execution we know nothing of: nowhere to send it
            await self._links.notifier.cancel(
                x.execution_id,
                work_queue(self._project_id, x.deployment_id),
                effect.reason,
                dispatch_id=effect.dispatch_id,
                worker_id=effect.worker_id,
            )

    async def _dispatch(self, effect: Dispatch) -> None:
        x = effect.execution
        assert x.raw is not None
        try:
            body = encode_work(
                dispatch_id=effect.dispatch_id,
                deadline=effect.deadline,
                results_queue=self._results_name,
                submission_raw=x.raw,
                lease_seconds=self._lifecycle.tunables.lease_seconds,
                dispatch_count=effect.count,
                retry_count=effect.retry_count,
            )
            name = work_queue(self._project_id, x.deployment_id)
            publisher = self._links.dispatch.pick(x.execution_id)
            await self._links.work_queues.publish(
                publisher, name, body, message_id=effect.dispatch_id
            )
        except BrokerError:
            raise
        except Exception as exc:
            # Not the broker: this work cannot be sent at all (e.g. a name AMQP
            # cannot carry). Failing the session would requeue it to fail the same
            # way on every redelivery, so it ends here, failed, with the reason.
            log.exception("%s: cannot dispatch %s", self._results_name, x.execution_id)
            self._lifecycle.on_dispatch_failed(
                x, effect.dispatch_id, f"cannot dispatch: {type(exc).__name__}: {exc}", time.time()
            )

    def _post(self, effect: Emit) -> asyncio.Future[None] | None:
        x = effect.execution
        return self._links.notifier.post(
            effect.status,
            self._envelope_of(x),
            dispatch_id=effect.dispatch_id,
            worker_id=effect.worker_id,
            duplicate_of=effect.duplicate_of,
            result=effect.result,
            error=effect.error,
            with_submission=effect.with_submission and x.envelope is not None,
            submission_raw=x.raw,
            cancelled_by=effect.cancelled_by,
            at=effect.at,
            started_at=effect.started_at,
            attempt=x.attempt,
            retry_count=x.retries if effect.retry_count is None else effect.retry_count,
            retry_at=effect.retry_at,
        )

    def _envelope_of(self, x: Execution) -> SubmissionEnvelope:
        if x.envelope is not None:
            return x.envelope
        # Rebuilt from the ledger, its submission not back yet: what the event needs.
        return SubmissionEnvelope(
            execution_id=x.execution_id,
            created_at="",
            project_id=self._project_id,
            workflow_id=x.workflow_id,
            deployment_id=x.deployment_id,
            queue_name=self._queue_name,
            concurrency_key=x.key,
            run_timeout_seconds=1,
            session_id="",
            submitted_by="",
        )
