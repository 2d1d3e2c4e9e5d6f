"""The per-queue gate: which submission may run now, never more than the limit.

Pure bookkeeping, no I/O (the owner does that), so every decision is taken
synchronously and two decisions never race::

    delivery ─► pending (FIFO, no slot) ─head─► deduplicated  (its key is held by a slot)
                                          └───► admitted      (a slot is free) ─► ... ─► terminal
    redelivery ─head, slot free─► recovering (holds a slot; waits for its dispatched marker)
                                    ├─ marker found ──────► in flight (not dispatched again)
                                    └─ grace over, none ──► admitted | deduplicated | pending
    marker for a pending redelivery ─► in flight (it *is* running: counted, even over the limit)

Slots used = executions held + orphan markers (markers whose submission we
have not seen: each may be a run in progress, so it counts until settled).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NamedTuple

from dispatcher.consumers import Delivery
from schemas.dispatch import Cancelled as CancelledResult
from schemas.dispatch import Completed, Failed
from schemas.envelope import SubmissionEnvelope

TerminalResult = Completed | Failed | CancelledResult


class Phase(StrEnum):
    PENDING = "pending"
    RECOVERING = "recovering"
    DISPATCHING = "dispatching"
    IN_FLIGHT = "in_flight"
    TERMINAL = "terminal"


@dataclass(slots=True, eq=False)
class Execution:
    envelope: SubmissionEnvelope
    raw: bytes
    submission: Delivery
    # The delivery attempt its events report (LifecycleEvent.attempt): the one
    # it was decided under, or its marker's once it is found in flight.
    attempt: int = 0
    # Loop time until which a redelivery waits for its marker; None if first delivery.
    recover_until: float | None = None
    phase: Phase = Phase.PENDING
    dispatch_id: str | None = None
    deadline: float | None = None  # Unix seconds
    work_queue: str = ""
    marker: Delivery | None = None
    timer: asyncio.TimerHandle | None = None
    # Set once its ``admitted`` event is out: later events of it wait for that.
    announced: asyncio.Event | None = None

    @property
    def execution_id(self) -> str:
        return self.envelope.execution_id

    @property
    def key(self) -> str | None:
        return self.envelope.concurrency_key


class Marker(NamedTuple):
    """What a marker on the results queue says: this dispatch was handed to the workers."""

    execution_id: str
    dispatch_id: str
    deadline: float
    attempt: int = 0


@dataclass(slots=True, eq=False)
class Orphan:
    """A dispatched marker whose submission we have not seen (yet)."""

    marker: Delivery
    message: Marker
    timer: asyncio.TimerHandle | None = None
    # A result that arrived before the submission; used when it does.
    result: tuple[Delivery, TerminalResult] | None = None


class Verdict(Enum):
    RECOVER = "recover"
    DEDUPLICATE = "deduplicate"
    ADMIT = "admit"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    execution: Execution
    duplicate_of: str | None = None


class Gate:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.admitting = True
        self.pending: deque[Execution] = deque()
        self.held: dict[str, Execution] = {}
        self.orphans: dict[str, Orphan] = {}
        self._waiting: dict[str, Execution] = {}  # redeliveries in pending, by execution id
        self._keys: dict[str, str] = {}  # concurrency key -> execution id holding it

    @property
    def used(self) -> int:
        return len(self.held) + len(self.orphans)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.held or self.orphans)

    def has_slot(self) -> bool:
        return self.limit is None or self.used < self.limit

    def find(self, execution_id: str) -> Execution | None:
        """A held execution, or a redelivery still pending."""
        return self.held.get(execution_id) or self._waiting.get(execution_id)

    def enqueue(self, execution: Execution) -> None:
        self.pending.append(execution)
        if execution.recover_until is not None:
            self._waiting[execution.execution_id] = execution

    def next(self, now: float) -> Decision | None:
        """Settle the head of the queue if it can be; the caller repeats until None."""
        if not self.admitting or not self.pending:
            return None
        execution = self.pending[0]
        if execution.recover_until is not None and now < execution.recover_until:
            if not self.has_slot():
                return None
            self._pop()
            self._hold(execution, Phase.RECOVERING)
            return Decision(Verdict.RECOVER, execution)
        holder = self._holder_of(execution)
        if holder is not None:
            # Settled without a slot: a duplicate never runs, so it never waits for one.
            self._pop()
            execution.phase = Phase.TERMINAL
            return Decision(Verdict.DEDUPLICATE, execution, holder)
        if not self.has_slot():
            return None
        self._pop()
        self._hold(execution, Phase.DISPATCHING)
        return Decision(Verdict.ADMIT, execution)

    def resolve_recovering(self, execution: Execution) -> Decision | None:
        """Its grace passed without a marker: no worker runs it, decide afresh.

        None means it went back to the head of the queue (no slot for it now).
        """
        holder = self._holder_of(execution)
        if holder is not None:
            self._release(execution)
            execution.phase = Phase.TERMINAL
            return Decision(Verdict.DEDUPLICATE, execution, holder)
        over = self.limit is not None and self.used - 1 >= self.limit
        if over or not self.admitting:
            # Back to the head, still findable: a late marker still shows it running.
            self._release(execution)
            execution.phase = Phase.PENDING
            self.pending.appendleft(execution)
            self._waiting[execution.execution_id] = execution
            return None
        execution.phase = Phase.DISPATCHING
        self._take_key(execution)
        return Decision(Verdict.ADMIT, execution)

    def mark_in_flight(self, execution: Execution) -> None:
        """A worker runs it (its marker or a report says so): it holds a slot, over the
        limit if need be, since refusing would not stop it."""
        if execution.phase is Phase.PENDING:
            self.pending.remove(execution)
            self._waiting.pop(execution.execution_id, None)
            self._hold(execution, Phase.IN_FLIGHT)
        else:
            execution.phase = Phase.IN_FLIGHT
            self._take_key(execution)

    def finish(self, execution: Execution) -> None:
        """Terminal: its slot and key are free."""
        if execution.phase is Phase.PENDING:
            self.pending.remove(execution)
            self._waiting.pop(execution.execution_id, None)
        elif execution.phase is not Phase.TERMINAL:
            self._release(execution)
        execution.phase = Phase.TERMINAL

    def take_all_pending(self) -> list[Execution]:
        taken = list(self.pending)
        self.pending.clear()
        self._waiting.clear()
        return taken

    def _pop(self) -> None:
        execution = self.pending.popleft()
        if execution.recover_until is not None:
            self._waiting.pop(execution.execution_id, None)

    def _hold(self, execution: Execution, phase: Phase) -> None:
        execution.phase = phase
        self.held[execution.execution_id] = execution
        self._take_key(execution)

    def _release(self, execution: Execution) -> None:
        self.held.pop(execution.execution_id, None)
        key = execution.key
        if key is not None and self._keys.get(key) == execution.execution_id:
            del self._keys[key]

    def _take_key(self, execution: Execution) -> None:
        key = execution.key
        if key is not None and key not in self._keys:
            self._keys[key] = execution.execution_id

    def _holder_of(self, execution: Execution) -> str | None:
        key = execution.key
        if key is None:
            return None
        holder = self._keys.get(key)
        return holder if holder != execution.execution_id else None
