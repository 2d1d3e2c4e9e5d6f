"""The broker side of ``worker._intake``: the work consumer, its prefetch, the waiting.

One task keeps the consumer at the prefetch the intake wants (a consumer's
prefetch is fixed when it starts, so a change is a cancel and a new consume),
hands back deliveries that waited too long, and, while some delivery is not
yet acknowledged, checks every ``DELIVERY_CHECK_S`` whether its channel died.

A start or an end wakes that task only when it has to act sooner than it
would (the prefetch is to change, or it sleeps past the next check a new
delivery needs): under load it sleeps ``DELIVERY_CHECK_S`` at a time and
was woken, to find nothing to do, once or twice per execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import DeliveredMessage

from broker.delivery import immediate
from broker.errors import BrokerError
from worker._delivery import Delivery, settle
from worker._intake import Admission, Intake

log = logging.getLogger("worker")

# How often deliveries not yet acknowledged are checked for a dead channel.
DELIVERY_CHECK_S = 0.05
CONSUME_ERRORS = (
    BrokerError,
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    OSError,
    TimeoutError,
    RuntimeError,
)


class WorkIntake:
    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        *,
        concurrency: int,
        hold_seconds: float,
        timeout: float,
        retry_interval: float,
        on_message: Callable[[DeliveredMessage], None],
        begin: Callable[[Delivery], None],
        check_deliveries: Callable[[], bool],
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._timeout = timeout
        self._retry_interval = retry_interval
        # Called in the channel reader's step, without a task per delivery
        # (broker.delivery); consumed through the robust queue, which consumes
        # again with it after a reconnect.
        self._on_message = immediate(on_message)
        self._begin = begin
        self._check_deliveries = check_deliveries
        self._intake: Intake[Delivery] = Intake(concurrency, hold_seconds)
        self._waiting: dict[tuple[str, str], Delivery] = {}
        self._tag: str | None = None
        self._prefetch = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._chores: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Until when the task sleeps (loop time; inf: until woken, or while it is awake).
        self._asleep_until = math.inf

    @property
    def waiting_keys(self) -> list[tuple[str, str]]:
        return list(self._waiting)

    async def start(self) -> None:
        await self._consume()
        self._task = asyncio.create_task(self._run(), name="work-intake")

    def waiting(self, key: tuple[str, str]) -> Delivery | None:
        return self._waiting.get(key)

    def withdraw(self, key: tuple[str, str]) -> Delivery | None:
        """Take a waiting delivery out (a cancel, a redelivery replacing a dead one)."""
        delivery = self._waiting.pop(key, None)
        if delivery is not None:
            self._intake.withdraw(delivery)
        return delivery

    def admit(self, delivery: Delivery, now: float) -> None:
        admission = self._intake.arrive(delivery, now)
        if admission is Admission.START:
            self._begin(delivery)
            self._poke(now)
        elif admission is Admission.WAIT:
            self._waiting[delivery.key] = delivery
            self._poke(now)
        else:
            self._poke(None)
            settle(delivery.message, requeue=True)

    def ended(self, delivery: Delivery) -> None:
        """A handler ended: its slot is free (for the oldest waiting delivery)."""
        started = self._intake.end(delivery)
        for waiting in started:
            self._waiting.pop(waiting.key, None)
            self._begin(waiting)
        self._poke(None)

    def leased(self, delivery: Delivery) -> None:
        self._intake.lease(delivery)
        self._poke(None)

    def _poke(self, arrived: float | None) -> None:
        """Wake the task if it must act before it would wake: the prefetch is to
        change, or a delivery that ``arrived`` then needs a check sooner."""
        if self._target() != self._prefetch or (
            arrived is not None and arrived + DELIVERY_CHECK_S < self._asleep_until
        ):
            self._changed.set()

    def later(self, chore: Coroutine[Any, Any, None]) -> None:
        """Run ``chore`` in a task of its own (``close`` waits for it, up to its grace)."""
        task = asyncio.create_task(chore)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def stop(self) -> None:
        """Take no more work: hand back every waiting delivery, cancel the consumer."""
        self._stopping = True
        for delivery in self._intake.drain():
            self._waiting.pop(delivery.key, None)
            settle(delivery.message, requeue=True)
        with contextlib.suppress(*CONSUME_ERRORS):
            await self._consume()

    async def close(self, grace: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._chores:
            await asyncio.wait(list(self._chores), timeout=grace)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        checked_at = -DELIVERY_CHECK_S
        while True:
            now = loop.time()
            handed = self._intake.due(now)
            for delivery in handed:
                self._waiting.pop(delivery.key, None)
            # Every delivery is looked at once per DELIVERY_CHECK_S, not at every
            # change (a start or an end wakes this loop: a pass over all of them
            # per execution, when many run).
            if now - checked_at >= DELIVERY_CHECK_S:
                checked_at = now
                for key, delivery in list(self._waiting.items()):
                    if not delivery.alive:
                        self.withdraw(key)
                unacknowledged = self._check_deliveries()
            else:
                unacknowledged = True  # some may have arrived since: look when it is time
            waits: list[float] = []
            try:
                # Before the hand-back: a consumer still open would get them again.
                await self._consume()
            except CONSUME_ERRORS as exc:
                log.warning("cannot change the work consumer (%r); retrying", exc)
                waits.append(self._retry_interval)
            for delivery in handed:
                settle(delivery.message, requeue=True)
            due = self._intake.next_due()
            if due is not None:
                waits.append(max(0.0, due - loop.time()))
            if self._waiting or unacknowledged:
                waits.append(max(0.0, checked_at + DELIVERY_CHECK_S - loop.time()))
            self._changed.clear()
            timeout = min(waits) if waits else None
            self._asleep_until = math.inf if timeout is None else loop.time() + timeout
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()
            finally:
                self._asleep_until = math.inf

    async def _consume(self) -> None:
        """Consume with the prefetch the intake wants (0: do not consume)."""
        if not self._lock.locked() and self._target() == self._prefetch:
            return  # nothing to change (most wakes): no lock, no timer
        # Bounded: a robust channel waits for the connection to come back.
        async with self._lock, asyncio.timeout(self._timeout):
            target = self._target()
            if target == self._prefetch:
                return
            if self._tag is not None:
                await self._queue.cancel(self._tag)
                self._tag = None
                self._prefetch = 0
            if target > 0:
                await self._channel.set_qos(prefetch_count=target)
                self._tag = await self._queue.consume(self._on_message)
                self._prefetch = target
            log.info("consuming %s with a prefetch of %d", self._queue.name, target)

    def _target(self) -> int:
        return 0 if self._stopping else self._intake.prefetch
