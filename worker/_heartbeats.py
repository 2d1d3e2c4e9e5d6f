"""Heartbeats: the running reports and lease renewals of a worker, one per results queue.

Carries out what ``worker._lease.Leases`` decides: one task sleeps until the
next flush or lease end, publishes each due flush (persistent, mandatory, with
confirm; at most one in flight per results queue) and tells the consumer which
executions a confirmed flush reported for the first time (their deliveries can
be acknowledged) and which leases ended unrenewed (their copies must stop).

A failed heartbeat is not retried as such: the next one, a moment later,
carries the same executions and supersedes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from broker.errors import BrokerError
from broker.publisher import ConfirmedPublisher
from schemas.dispatch import Heartbeat, HeartbeatEntry, encode
from schemas.ids import now_rfc3339
from worker._lease import Leases

log = logging.getLogger("worker")

K = TypeVar("K", bound=Hashable)


class Heartbeats(Generic[K]):
    def __init__(
        self,
        publisher: ConfirmedPublisher,
        *,
        worker_id: str,
        running_delay: float,
        confirm_timeout: float,
        entry: Callable[[K], HeartbeatEntry],
        on_reported: Callable[[list[K]], None],
        on_expired: Callable[[list[K]], None],
    ) -> None:
        self._publisher = publisher
        self._worker_id = worker_id
        self._confirm_timeout = confirm_timeout
        self._entry = entry
        self._on_reported = on_reported
        self._on_expired = on_expired
        self._leases: Leases[K] = Leases(running_delay)
        self._wake = asyncio.Event()
        self._flights: dict[str, tuple[frozenset[K], asyncio.Task[None]]] = {}
        self._sequence = itertools.count()
        self._task: asyncio.Task[None] | None = None
        # When the schedule sleeps until (loop time; -inf while it is not asleep).
        self._asleep_until = -math.inf

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeats")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *(f for _, f in self._flights.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    def add(self, key: K, queue: str, lease_seconds: float, started: float) -> None:
        self._leases.add(key, queue, lease_seconds, started)
        if started + self._leases.running_delay < self._asleep_until:
            # Due before the schedule would look again. (Most starts are not: the
            # schedule already waits for an earlier one, and a pass over every lease
            # per start is what waking it would cost.)
            self._wake.set()

    def finish(self, key: K) -> None:
        self._leases.finish(key)

    def remove(self, key: K) -> None:
        self._leases.remove(key)

    def reported(self, key: K) -> bool:
        return self._leases.reported(key)

    async def flushed(self, key: K) -> None:
        """Until no heartbeat carrying ``key`` is in flight: a result published after
        it cannot overtake it (the publisher spreads messages over channels)."""
        for carried, flight in list(self._flights.values()):
            if key in carried:
                await asyncio.wait([flight])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            try:
                expired = self._leases.expired(now)
                for key in expired:
                    self._leases.remove(key)
                if expired:
                    self._on_expired(expired)
                for queue in self._leases.due(now):
                    self._send(queue, now)
            except Exception:
                # This task renews every lease of the process: it must not die of one bug.
                log.exception("heartbeat schedule failed; going on")
            wakeup = self._leases.next_wakeup()
            self._wake.clear()
            timeout = None if wakeup is None else max(0.0, wakeup - loop.time())
            self._asleep_until = math.inf if wakeup is None else wakeup
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            finally:
                self._asleep_until = -math.inf

    def _send(self, queue: str, now: float) -> None:
        carried = self._leases.begin(queue, now)
        heartbeat = Heartbeat(
            worker_id=self._worker_id,
            at=now_rfc3339(),
            executions=[self._entry(key) for key in carried],
        )
        timeout = min(self._confirm_timeout, self._leases.interval(queue))
        flight = asyncio.create_task(
            self._publish(queue, carried, encode(heartbeat), now, timeout),
            name=f"heartbeat-{queue}",
        )
        self._flights[queue] = (frozenset(carried), flight)

    async def _publish(
        self, queue: str, carried: list[K], body: bytes, sent: float, timeout: float
    ) -> None:
        loop = asyncio.get_running_loop()
        message_id = f"heartbeat/{self._worker_id}/{next(self._sequence)}"
        try:
            await self._publisher.publish(queue, body, message_id=message_id, timeout=timeout)
        except BrokerError as exc:
            log.warning("heartbeat to %s not confirmed (%r)", queue, exc)
            self._leases.failed(queue, loop.time())
        else:
            first = self._leases.confirmed(queue, carried, sent)
            if first:
                self._on_reported(first)
        finally:
            self._flights.pop(queue, None)
            self._wake.set()
