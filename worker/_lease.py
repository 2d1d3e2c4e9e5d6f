"""When to send heartbeats, and when the worker's own lease on an execution ends.

Pure (no I/O, the caller passes monotonic times): ``worker._heartbeats``
publishes what this says and feeds back what the broker answered.

- An execution still running ``running_delay`` after it started is reported in
  the next heartbeat of its results queue; one that ends earlier never is.
- A results queue is flushed (one heartbeat carrying everything this worker
  runs for it) when an execution of it passes ``running_delay``, and every
  ``lease_seconds / 3`` (the smallest of its executions) after the send of the
  last confirmed flush. At most one flush per queue is in flight; what becomes
  due meanwhile goes in the next one, right after it.
- An execution reported in a confirmed heartbeat is leased: its lease here ends
  at ``send time of the last confirmed heartbeat carrying it + lease_seconds -
  margin``. The owner keeps it until ``receipt + lease_seconds``, so the copy
  here stops (at least ``margin`` plus the transit) before the owner may hand
  the execution to another worker.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# After a heartbeat failed (no confirm, broker away), the next attempt waits
# this long, or half the renewal interval if that is shorter (so a short lease
# still gets a second try before it ends).
RETRY_S = 0.5


def margin(lease_seconds: float) -> float:
    """How long before the owner's lease ends the worker's own ends.

    ``max(1 s, lease / 10)``, but never more than a third of the lease: a
    renewal is sent every third, and must have the rest to be confirmed in.
    """
    return min(max(1.0, lease_seconds / 10), lease_seconds / 3)


def renew_interval(lease_seconds: float) -> float:
    return lease_seconds / 3


def lease_end(sent: float, lease_seconds: float) -> float:
    return sent + lease_seconds - margin(lease_seconds)


@dataclass(slots=True)
class _Held:
    queue: str
    lease_seconds: float
    due: float
    """When it is first reported, if still running: start + running_delay."""
    reported: bool = False
    """It was in a confirmed heartbeat."""
    lease_end: float | None = None


@dataclass(slots=True)
class _Queue(Generic[K]):
    members: set[K] = field(default_factory=set)
    last_sent: float | None = None
    """Send time of the last confirmed flush."""
    in_flight: bool = False
    retry_at: float | None = None


class Leases(Generic[K]):
    def __init__(self, running_delay: float) -> None:
        self.running_delay = running_delay
        self._held: dict[K, _Held] = {}
        self._queues: dict[str, _Queue[K]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def add(self, key: K, queue: str, lease_seconds: float, started: float) -> None:
        self._held[key] = _Held(queue, lease_seconds, started + self.running_delay)
        held = self._queues.get(queue)
        if held is None:  # (not setdefault: that builds a _Queue per call)
            held = self._queues[queue] = _Queue()
        held.members.add(key)

    def finish(self, key: K) -> None:
        """The handler of ``key`` ended: if it was never reported, it never will be
        (its delivery, not a lease, protects it until its result is confirmed)."""
        held = self._held.get(key)
        if held is not None and not held.reported:
            self.remove(key)

    def remove(self, key: K) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        queue = self._queues[held.queue]
        queue.members.discard(key)
        if not queue.members and not queue.in_flight:
            del self._queues[held.queue]

    def reported(self, key: K) -> bool:
        held = self._held.get(key)
        return held is not None and held.reported

    def due(self, now: float) -> list[str]:
        """The results queues to flush now."""
        return [name for name, queue in self._queues.items() if self._next(queue) <= now]

    def begin(self, queue_name: str, now: float) -> list[K]:
        """A flush of ``queue_name`` starts: the executions it carries (those past
        ``running_delay``)."""
        queue = self._queues[queue_name]
        queue.in_flight = True
        return [key for key in queue.members if self._held[key].due <= now]

    def confirmed(self, queue_name: str, carried: Iterable[K], sent: float) -> list[K]:
        """The flush sent at ``sent`` was confirmed; returns the executions it reported
        for the first time (their deliveries can be acknowledged now)."""
        first: list[K] = []
        for key in carried:
            held = self._held.get(key)
            if held is None:
                continue
            if not held.reported:
                held.reported = True
                first.append(key)
            held.lease_end = lease_end(sent, held.lease_seconds)
        queue = self._settle(queue_name)
        if queue is not None:
            queue.last_sent = sent
            queue.retry_at = None
        return first

    def failed(self, queue_name: str, now: float) -> None:
        queue = self._settle(queue_name)
        if queue is not None:
            queue.retry_at = now + min(RETRY_S, self._interval(queue) / 2)

    def expired(self, now: float) -> list[K]:
        """Leased executions whose lease here has ended without a renewal."""
        return [
            key
            for key, held in self._held.items()
            if held.lease_end is not None and held.lease_end <= now
        ]

    def next_wakeup(self) -> float | None:
        """The earliest time ``due`` or ``expired`` can change, if nothing else happens."""
        times = [self._next(queue) for queue in self._queues.values()]
        times.extend(h.lease_end for h in self._held.values() if h.lease_end is not None)
        finite = [t for t in times if t != float("inf")]
        return min(finite) if finite else None

    def _settle(self, queue_name: str) -> _Queue[K] | None:
        queue = self._queues.get(queue_name)
        if queue is None:
            return None
        queue.in_flight = False
        if not queue.members:
            del self._queues[queue_name]
            return None
        return queue

    def interval(self, queue_name: str) -> float:
        """The renewal interval of ``queue_name``: a third of its shortest lease."""
        queue = self._queues.get(queue_name)
        return self._interval(queue) if queue is not None and queue.members else float("inf")

    def _interval(self, queue: _Queue[K]) -> float:
        return min(renew_interval(self._held[key].lease_seconds) for key in queue.members)

    def _next(self, queue: _Queue[K]) -> float:
        """When ``queue`` is next to be flushed (``inf``: not until something changes)."""
        if queue.in_flight or not queue.members:
            return float("inf")
        held = [self._held[key] for key in queue.members]
        times = [h.due for h in held if not h.reported]
        if queue.last_sent is not None and any(h.reported for h in held):
            times.append(queue.last_sent + self._interval(queue))
        if not times:
            return float("inf")
        when = min(times)
        if queue.retry_at is not None:
            when = max(when, queue.retry_at)
        return when
