"""Which work deliveries start now, which wait, and how much the broker may send.

Pure (no I/O, the caller passes the time): the consumer feeds it what happens
and carries out what it says.

A running execution's delivery is acknowledged early, once a heartbeat carrying
it is confirmed (DESIGN §3: from then on its lease protects it). That gives the
broker credit for another delivery: with a prefetch of N and k leased runs, up
to N + k deliveries can be in hand for N slots. The extras wait here, unstarted,
and start as slots free, oldest first. None waits long: once the oldest has
waited ``hold_seconds / 2``, every waiting one is handed back (nack, requeue:
another worker takes it) and the worker consumes only as many as it has free
slots (none: it does not consume) until its leased runs have ended; then it
consumes with the full prefetch again.
"""

from __future__ import annotations

from collections.abc import Hashable
from enum import StrEnum
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Admission(StrEnum):
    START = "start"
    """Run it now: a slot is free."""
    WAIT = "wait"
    """Keep it unstarted until a slot frees (or it is handed back)."""
    HAND_BACK = "hand_back"
    """Nack it with requeue now: no slot, and the worker is consuming less to stop this."""


class Intake(Generic[K]):
    def __init__(self, concurrency: int, hold_seconds: float) -> None:
        self.concurrency = concurrency
        self.max_wait = hold_seconds / 2
        self._running: set[K] = set()
        self._leased: set[K] = set()
        self._waiting: dict[K, float] = {}  # insertion order: oldest first
        self._restricted = False

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> tuple[K, ...]:
        return tuple(self._waiting)

    @property
    def prefetch(self) -> int:
        """The prefetch the work consumer should have; 0: do not consume."""
        if not self._restricted:
            return self.concurrency
        return max(0, self.concurrency - len(self._running))

    def arrive(self, key: K, now: float) -> Admission:
        """A delivery arrived (not a duplicate, not poison: one to run)."""
        if len(self._running) < self.concurrency and not self._waiting:
            self._running.add(key)
            return Admission.START
        if self._restricted:
            return Admission.HAND_BACK
        self._waiting[key] = now
        return Admission.WAIT

    def lease(self, key: K) -> None:
        """The delivery of running ``key`` was acknowledged: its slot no longer counts
        against the prefetch."""
        if key in self._running:
            self._leased.add(key)

    def end(self, key: K) -> list[K]:
        """Running ``key`` ended (its handler is done); the waiting ones to start now."""
        self._running.discard(key)
        self._leased.discard(key)
        started: list[K] = []
        while self._waiting and len(self._running) < self.concurrency:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._running.add(oldest)
            started.append(oldest)
        if self._restricted and not self._leased:
            self._restricted = False
        return started

    def withdraw(self, key: K) -> bool:
        """A waiting delivery went away (cancelled, or its channel died); was it waiting?"""
        return self._waiting.pop(key, None) is not None

    def due(self, now: float) -> list[K]:
        """The waiting deliveries to hand back now: all of them once the oldest has
        waited ``hold_seconds / 2``."""
        if not self._waiting or now - next(iter(self._waiting.values())) < self.max_wait:
            return []
        handed = list(self._waiting)
        self._waiting.clear()
        if self._leased:
            self._restricted = True
        return handed

    def next_due(self) -> float | None:
        """When ``due`` will hand something back, if nothing changes."""
        if not self._waiting:
            return None
        return next(iter(self._waiting.values())) + self.max_wait

    def drain(self) -> list[K]:
        """Stopping: every waiting delivery, to hand back; none will start."""
        handed = list(self._waiting)
        self._waiting.clear()
        return handed
