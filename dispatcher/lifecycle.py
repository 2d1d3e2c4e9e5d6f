"""Every execution of one queue, from delivery to its end: a pure state machine.

No I/O and no clock of its own (h11's habit): the owner feeds it what
happened, with the time, and carries out the effects it answers, in phases
(``dispatcher/effects.py``): first the ledger record of the flush (confirmed),
then work, cancels and lifecycle events (confirmed), then acknowledgements.
So an acknowledgement never precedes what makes it safe, and every ordering
below is a plain unit test (``tests/test_dispatcher_lifecycle.py``)::

    submission ─► PENDING ─head─► key held by a slot? ─────────► deduplicated
                    │        └── a cancel was asked for? ──────► cancelled
                    │        └── slot free ─► DISPATCHED ─(a heartbeat)─► RUNNING
                    │                          │  ▲                        │ lease renewed
                    │                          │  └── lease expired, ◄─────┘ by heartbeats
                    │                          │      or released: dispatched again
                    └─ held hold_seconds: its envelope goes to the ledger,
                       the delivery is acknowledged (it waits on)
    DISPATCHED | RUNNING ─► result ─► completed | failed | cancelled | timed_out
                         ─► deadline ─► timed_out (+ cancel to its workers)
                         ─► user cancel ─► cancelled (+ cancel to its workers)
                         ─► Failed asking for a retry, due before the deadline
                              ─► WAITING_RETRY (slot and key kept) ─(retry_at)─►
                                 DISPATCHED again: a new dispatch_id, retry_count + 1

Retries (``_schedule_retry``). The worker knows the workflow's policy and says
in its ``Failed`` report whether another run is wanted, and after how long; the
owner decides: a retry due at or after the run's deadline is none (the deadline
is fixed at admission and covers every run and every wait), so the execution
ends ``failed`` at once. A waiting retry keeps its slot and its key (DESIGN §3:
a slot from admission until terminal; a duplicate by key stays deduplicated),
is in the ledger with its ``retry_at`` (a new owner dispatches it then), and
ends like any in-flight execution on a cancel or its deadline.

Leases (DESIGN §3). A delivery is never held longer than ``hold_seconds``: a
submission whose execution is still pending or in flight by then is copied
into the ledger and acknowledged; the worker acknowledges its work once it
reported it running. From the first heartbeat on, only the lease keeps the
execution: it is dispatched again only when the lease expired (or the worker
released it), with a new ``dispatch_id``; reports of the old one are told to stop.

The ledger (``LedgerRecord`` on the queue's results queue, read back and held by
the owner): one record per flush with what changed, and a ``checkpoint`` (the
whole state) whenever the changes since the last one outweigh the state, or
``hold_seconds / 2`` passed. A confirmed checkpoint lets every older record be
acknowledged; the newest stays held, so a standby is woken by its return. A
new owner folds the records it receives (``rebuild``): in-flight executions keep
their slots and leases (renewed from the takeover on, never shortened), pending
ones keep their place, tombstones drop redeliveries of what already ended.
Flushes are sequential, so only the work of the last record of a dead owner
may not have been published: those executions get a lease at the takeover,
like running ones, and are dispatched again if no worker reports them within it.
A second worker reporting one dispatch (not a broker redelivery) is told to stop.
"""

from __future__ import annotations

import heapq
import math
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson

from schemas.dispatch import (
    Cancelled,
    CancelRequest,
    Completed,
    ErrorInfo,
    ExecutionStatus,
    Failed,
    Heartbeat,
    LedgerRecord,
    Released,
)
from schemas.envelope import SubmissionEnvelope
from schemas.ids import rfc3339

Ref = int
"""An opaque handle of a delivery the owner holds."""

S = ExecutionStatus
TerminalResult = Completed | Failed | Cancelled
# Terminal execution ids remembered, so a late report or redelivery of one is settled.
RECENT_TERMINAL = 4096
MIN_CHECKPOINT_ENTRIES = 64


class Stage(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    WAITING_RETRY = "waiting_retry"
    TERMINAL = "terminal"


@dataclass(frozen=True, slots=True)
class Tunables:
    lease_seconds: float = 30.0
    hold_seconds: float = 20.0
    cancel_queued_wait_seconds: float = 3600.0
    cancel_unknown_wait_seconds: float = 10.0


@dataclass(slots=True, eq=False)
class Execution:
    execution_id: str
    attempt: int
    key: str | None
    workflow_id: str
    deployment_id: str
    envelope: SubmissionEnvelope | None
    raw: bytes | None
    stage: Stage = Stage.PENDING
    submission: Ref | None = None  # its delivery, while we hold it
    received_at: float = 0.0
    released: bool = False  # the ledger holds its envelope; its delivery was let go
    in_ledger: bool = False  # some record names it: its end needs a tombstone
    dispatch_id: str | None = None
    dispatches: int = 0  # how many times it was handed out
    deadline: float | None = None
    lease_until: float | None = None
    worker_id: str | None = None
    started_at: str | None = None
    republish: bool = False  # to be dispatched once its submission is back (no envelope yet)
    # Its dispatch may never have been published (a dead owner's last record named
    # it, or it waits for its submission to be sent again): it keeps a lease until
    # a worker reports it, and the ledger says so, so every later owner knows too.
    unsent: bool = False
    retries: int = 0  # retries before the current (or next) run: Polos's retry_count
    retry_at: float | None = None  # when waiting for a retry: its dispatch
    retry_of: str | None = None  # when waiting for a retry: the dispatch that failed

    @property
    def holds_slot(self) -> bool:
        return self.stage in (Stage.DISPATCHED, Stage.RUNNING, Stage.WAITING_RETRY)

    @property
    def run_timeout(self) -> int | None:
        return self.envelope.run_timeout_seconds if self.envelope is not None else None


# -- effects ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    execution: Execution
    dispatch_id: str
    deadline: float
    count: int = 1
    retry_count: int = 0


@dataclass(frozen=True, slots=True)
class Emit:
    """A lifecycle event. A terminal one must be confirmed before the end is recorded
    (the ledger's tombstone) and the deliveries it settles are acknowledged: the
    effector tells ``on_announced``; until then the execution stays in the ledger as
    it was, so a new owner hears of it again (its result or submission comes back)."""

    status: ExecutionStatus
    execution: Execution
    dispatch_id: str | None = None
    worker_id: str | None = None
    duplicate_of: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    with_submission: bool = False
    cancelled_by: str | None = None
    at: str | None = None
    started_at: str | None = None
    terminal: bool = False
    # The run it is about; None: the execution's current one when it is published.
    retry_count: int | None = None
    retry_at: str | None = None


@dataclass(frozen=True, slots=True)
class SendCancel:
    execution: Execution
    reason: Literal["timeout", "user", "superseded"]
    dispatch_id: str | None = None
    worker_id: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    ref: Ref


Effect = Dispatch | Emit | SendCancel | Ack


@dataclass(frozen=True, slots=True)
class LedgerWrite:
    seq: int
    checkpoint: bool
    body: bytes
    # Deliveries settled by the ends this record carries: acknowledged once it is confirmed.
    settles: tuple[Ref, ...] = ()


@dataclass(slots=True)
class _Ending:
    """A terminal execution whose event is not confirmed yet."""

    execution: Execution
    was: Stage  # its stage before: what the ledger says of it until the event is out
    refs: list[Ref]


@dataclass(slots=True)
class _WantedCancel:
    requested_by: str
    until: float


class _Timer(StrEnum):
    DEADLINE = "deadline"
    LEASE = "lease"
    HOLD = "hold"
    RETRY = "retry"


_REBUILT_STAGES = {
    "dispatched": Stage.DISPATCHED,
    "running": Stage.RUNNING,
    "waiting_retry": Stage.WAITING_RETRY,
}


def _at(now: float) -> str:
    """Events say when the owner decided, not when they were published."""
    return rfc3339(int(now * 1e9))


def user_cancel(requested_by: str) -> ErrorInfo:
    return ErrorInfo(type="cancelled", message=f"cancelled on request of {requested_by}")


class QueueLifecycle:
    """The executions of one submission queue, as its owner knows them."""

    def __init__(
        self,
        limit: int | None,
        tunables: Tunables,
        *,
        owner: str,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.limit = limit
        self.admitting = True
        self.tunables = tunables
        self.owner = owner
        self._new_id = new_id
        self.executions: dict[str, Execution] = {}  # every one not terminal
        self._fifo: deque[Execution] = deque()
        self._parked = 0  # of the fifo, those released (asked after every flush: counted)
        self._keys: dict[str, str] = {}  # concurrency key -> the execution holding it
        self._used = 0
        self._recent: OrderedDict[str, float] = OrderedDict()  # terminal id -> when
        self._ending: dict[str, _Ending] = {}  # terminal, its event not confirmed yet
        self._settled_by_record: list[Ref] = []  # acknowledged behind the next record
        self._cancels: dict[str, _WantedCancel] = {}
        self._timers: list[tuple[float, str, str]] = []
        self._effects: list[Effect] = []
        # The ledger.
        self.epoch = 1
        self._seq = 0
        self._dirty: OrderedDict[str, Execution | str] = OrderedDict()  # str: a tombstone
        self._since_checkpoint = 0
        self._last_checkpoint_at = -math.inf
        self._want_checkpoint = True
        self._checkpointed = -1  # seq of the newest confirmed checkpoint
        self._held_records: list[tuple[int, Ref]] = []
        self._foreign_records: list[Ref] = []

    # -- what the owner asks ------------------------------------------------------------

    @property
    def held(self) -> int:
        """Executions holding a slot."""
        return self._used

    @property
    def pending(self) -> int:
        return len(self._fifo)

    @property
    def parked(self) -> int:
        """Pending executions whose submission delivery was let go (kept in the ledger)."""
        return self._parked

    @property
    def busy(self) -> bool:
        return bool(self.executions) or bool(self._ending)

    @property
    def announcing(self) -> int:
        """Executions ended whose terminal event is not confirmed yet."""
        return len(self._ending)

    def has_slot(self) -> bool:
        return self.limit is None or self._used < self.limit

    def next_wakeup(self) -> float:
        """When ``tick`` has something to do (deadlines, leases, holds, the checkpoint)."""
        while self._timers and not self._timer_valid(self._timers[0]):
            heapq.heappop(self._timers)
        wake = self._last_checkpoint_at + self.tunables.hold_seconds / 2
        if self._timers:
            wake = min(wake, self._timers[0][0])
        if self._cancels:
            wake = min(wake, min(c.until for c in self._cancels.values()))
        return wake

    def take_effects(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    # -- inputs --------------------------------------------------------------------------

    def rebuild(self, records: Iterable[tuple[Ref, LedgerRecord]], now: float) -> None:
        """Fold the records of the owners before us (received before our probe)."""
        ordered = sorted(records, key=lambda item: (item[1].epoch, item[1].seq))
        state: OrderedDict[str, Any] = OrderedDict()
        for ref, record in ordered:
            self._foreign_records.append(ref)
            if record.checkpoint:
                state.clear()
                self._cancels.clear()
            for entry in record.entries:
                if entry.stage == "ended":
                    state.pop(entry.execution_id, None)
                    self._cancels.pop(entry.execution_id, None)
                    self._remember(entry.execution_id, now)
                elif entry.stage == "cancel":
                    if entry.until is not None and entry.requested_by is not None:
                        self._cancels[entry.execution_id] = _WantedCancel(
                            entry.requested_by, entry.until
                        )
                else:
                    state[entry.execution_id] = entry
        if ordered:
            self.epoch = ordered[-1][1].epoch + 1
            last = ordered[-1][1]
            unsure = {e.execution_id for e in last.entries if e.stage == "dispatched"}
        else:
            unsure = set()
        # And what an owner before it already was not sure of (carried in its records).
        unsure |= {i for i, e in state.items() if e.stage == "dispatched" and e.unsent}
        for entry in state.values():
            submission = entry.submission
            x = Execution(
                execution_id=entry.execution_id,
                attempt=entry.attempt,
                key=entry.concurrency_key,
                workflow_id=entry.workflow_id,
                deployment_id=entry.deployment_id,
                envelope=submission,
                raw=orjson.dumps(submission.model_dump(mode="json")) if submission else None,
                released=submission is not None,
                in_ledger=True,
                dispatch_id=entry.dispatch_id,
                dispatches=entry.dispatch_count,
                deadline=entry.deadline,
                retries=entry.retry_count,
            )
            self.executions[x.execution_id] = x
            if entry.stage == "pending":
                self._fifo.append(x)
                self._parked += x.released
                continue
            x.stage = _REBUILT_STAGES[entry.stage]
            self._take_slot(x)
            if x.deadline is not None:
                self._arm(x.deadline, _Timer.DEADLINE, x)
            if x.stage is Stage.WAITING_RETRY:
                # Due at the time its owner set (at once if that passed).
                x.retry_at = entry.retry_at if entry.retry_at is not None else now
                x.retry_of = entry.retry_of
                self._arm(x.retry_at, _Timer.RETRY, x)
            elif x.stage is Stage.RUNNING:
                # Renewed from now: a lease is never shortened by a takeover.
                self._renew(x, now)
            elif x.execution_id in unsure:
                # A dead owner's last flush may have died before its work went out. A
                # lease from now: a worker that runs it reports within it; if none
                # does, it is dispatched again when the lease expires.
                x.unsent = True
                self._renew(x, now)
        self._want_checkpoint = True
        self._admit(now)

    def on_submission(
        self, ref: Ref, envelope: SubmissionEnvelope, raw: bytes, attempt: int, now: float
    ) -> None:
        execution_id = envelope.execution_id
        x = self.executions.get(execution_id)
        if x is not None:
            if x.submission is None and not x.released:
                # In flight per the ledger; this is its held submission, returned.
                x.submission, x.received_at = ref, now
                x.envelope, x.raw = envelope, raw
                self._arm(now + self.tunables.hold_seconds, _Timer.HOLD, x)
                if x.republish:
                    self._republish(x)
            else:
                self._effects.append(Ack(ref))  # a copy we have already
            return
        if execution_id in self._recent:
            self._effects.append(Ack(ref))  # it ended; the acknowledgement was lost
            return
        x = Execution(
            execution_id=execution_id,
            attempt=attempt,
            key=envelope.concurrency_key,
            workflow_id=envelope.workflow_id,
            deployment_id=envelope.deployment_id,
            envelope=envelope,
            raw=raw,
            submission=ref,
            received_at=now,
        )
        self.executions[execution_id] = x
        self._fifo.append(x)
        self._arm(now + self.tunables.hold_seconds, _Timer.HOLD, x)
        self._admit(now)

    def on_heartbeat(self, ref: Ref, heartbeat: Heartbeat, now: float) -> None:
        for entry in heartbeat.executions:
            x = self.executions.get(entry.execution_id)
            if x is None or not x.holds_slot:
                if entry.execution_id in self._recent:
                    self._stop_copy(entry.execution_id, entry.dispatch_id, heartbeat.worker_id, x)
                continue
            if entry.dispatch_id != x.dispatch_id:
                self._stop_copy(entry.execution_id, entry.dispatch_id, heartbeat.worker_id, x)
                continue
            if x.stage is Stage.RUNNING and x.worker_id not in (None, heartbeat.worker_id):
                if not entry.redelivered:
                    # The same dispatch on a second worker (sent again after a takeover).
                    self._stop_copy(entry.execution_id, entry.dispatch_id, heartbeat.worker_id, x)
                    continue
                # Redelivered by the broker: the worker that had it is gone.
                x.stage = Stage.DISPATCHED
            self._renew(x, now)
            if x.stage is Stage.DISPATCHED:
                x.stage = Stage.RUNNING
                x.unsent = False
                x.worker_id = heartbeat.worker_id
                x.started_at = entry.started_at
                self._ledger(x)
                self._effects.append(
                    Emit(
                        S.RUNNING,
                        x,
                        dispatch_id=x.dispatch_id,
                        worker_id=x.worker_id,
                        at=entry.started_at,
                    )
                )
        self._effects.append(Ack(ref))

    def on_result(self, ref: Ref, result: TerminalResult, now: float) -> None:
        x = self.executions.get(result.execution_id)
        if x is not None and isinstance(result, Failed) and self._failed_again(x, result, now):
            self._effects.append(Ack(ref))
            return
        if x is None or not x.holds_slot or result.dispatch_id != x.dispatch_id:
            self._effects.append(Ack(ref))  # late, stale, or of a copy we stopped
            return
        if isinstance(result, Failed) and self._schedule_retry(x, result, now):
            self._effects.append(Ack(ref))
            return
        if isinstance(result, Completed):
            status, value, error = S.COMPLETED, result.result, None
        elif isinstance(result, Failed):
            status, value, error = S.FAILED, None, result.error
        elif result.reason == "timeout":
            # The worker enforces the same deadline and may report it first.
            status, value = S.TIMED_OUT, None
            error = ErrorInfo(type="timeout", message="the worker stopped it at its deadline")
        else:
            status, value = S.CANCELLED, None
            error = ErrorInfo(type="cancelled", message=result.reason)
        self._finish(
            x,
            status,
            now,
            worker_id=result.worker_id,
            result=value,
            error=error,
            started_at=result.started_at or x.started_at,
            settles=ref,
        )
        self._admit(now)

    def on_released(self, ref: Ref, released: Released, now: float) -> None:
        x = self.executions.get(released.execution_id)
        if x is not None and x.holds_slot and released.dispatch_id == x.dispatch_id:
            self._dispatch_again(x, now)
        self._effects.append(Ack(ref))

    def on_cancel_request(self, ref: Ref, request: CancelRequest, now: float) -> None:
        execution_id = request.execution_id
        x = self.executions.get(execution_id)
        if x is not None:
            self._cancel(x, request.requested_by, now)
            self._admit(now)
        elif execution_id not in self._recent and execution_id not in self._cancels:
            # Not here (yet): still in the broker, or on its way after a takeover.
            wait = (
                self.tunables.cancel_queued_wait_seconds
                if request.seen_status in (None, S.QUEUED)
                else self.tunables.cancel_unknown_wait_seconds
            )
            self._cancels[execution_id] = _WantedCancel(request.requested_by, now + wait)
            self._dirty[execution_id] = f"cancel:{execution_id}"
        self._effects.append(Ack(ref))

    def on_dispatch_failed(self, x: Execution, dispatch_id: str, error: str, now: float) -> None:
        """The work could not even be built (not the broker: that ends the session)."""
        if x.holds_slot and x.dispatch_id == dispatch_id:
            self._finish(x, S.FAILED, now, error=ErrorInfo(type="dispatch_error", message=error))
            self._admit(now)

    def on_own_record(self, ref: Ref, seq: int) -> None:
        if seq < self._checkpointed:
            self._effects.append(Ack(ref))
        else:
            self._held_records.append((seq, ref))

    def on_ledger_written(self, write: LedgerWrite) -> list[Ack]:
        """The record is confirmed: after a checkpoint, the older records may go.

        Answered, not queued with the other effects: whatever was decided while the
        record was on its way belongs to the next flush, behind the next record.
        """
        acks = [Ack(ref) for ref in write.settles]
        if not write.checkpoint:
            return acks
        self._checkpointed = write.seq
        keep: list[tuple[int, Ref]] = []
        for seq, ref in self._held_records:
            if seq < write.seq:
                acks.append(Ack(ref))
            else:
                keep.append((seq, ref))
        self._held_records = keep
        acks.extend(Ack(ref) for ref in self._foreign_records)
        self._foreign_records.clear()
        return acks

    def on_announced(self, executions: Iterable[Execution]) -> None:
        """Their terminal events are confirmed: record their ends, then let go of
        the deliveries they settle (behind the record, if a record names them)."""
        for x in executions:
            ending = self._ending.pop(x.execution_id, None)
            if ending is None:
                continue
            if x.in_ledger:
                self._dirty[x.execution_id] = x.execution_id  # a tombstone
                self._settled_by_record.extend(ending.refs)
            else:
                self._effects.extend(Ack(ref) for ref in ending.refs)

    def set_limit(self, limit: int | None, now: float) -> None:
        self.limit = limit
        self._admit(now)

    def drain(self) -> None:
        self.admitting = False

    def tick(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            item = heapq.heappop(self._timers)
            if not self._timer_valid(item):
                continue
            _, kind, execution_id = item
            x = self.executions[execution_id]
            if kind == _Timer.DEADLINE:
                timeout = x.run_timeout
                message = f"not finished within {timeout}s" if timeout else "deadline passed"
                self._finish(x, S.TIMED_OUT, now, error=ErrorInfo(type="timeout", message=message))
                self._effects.append(SendCancel(x, "timeout"))
            elif kind == _Timer.LEASE:
                self._dispatch_again(x, now)
            elif kind == _Timer.RETRY:
                self._retry_due(x, now)
            else:
                self._release_submission(x)
        for execution_id, wanted in list(self._cancels.items()):
            if wanted.until <= now:
                del self._cancels[execution_id]
        if now >= self._last_checkpoint_at + self.tunables.hold_seconds / 2:
            self._want_checkpoint = True
        self._admit(now)

    def take_ledger(self, now: float) -> LedgerWrite | None:
        """The record of this flush: what changed, or the whole state when due."""
        live = len(self.executions) + len(self._cancels)
        checkpoint = (
            self._want_checkpoint
            or self._since_checkpoint + len(self._dirty) >= max(MIN_CHECKPOINT_ENTRIES, live)
            or now >= self._last_checkpoint_at + self.tunables.hold_seconds / 2
        )
        if not checkpoint and not self._dirty and not self._settled_by_record:
            return None
        if checkpoint:
            # Ends not announced yet stay as they were: a new owner hears of them again.
            entries = [
                self._entry(e.execution, e.was)
                for e in self._ending.values()
                if e.execution.in_ledger
            ]
            entries += [self._entry(x) for x in self._in_ledger_order()]
            entries += [self._cancel_entry(i, c) for i, c in self._cancels.items()]
            # Tombstones of recent ends: a submission whose acknowledgement was lost
            # in a crash must not run again.
            horizon = now - 2 * self.tunables.hold_seconds
            entries += [
                {"execution_id": i, "stage": "ended"}
                for i, at in self._recent.items()
                if at >= horizon and i not in self._ending
            ]
            for x in self.executions.values():
                x.in_ledger = True
            self._since_checkpoint = 0
            self._last_checkpoint_at = now
            self._want_checkpoint = False
        else:
            entries = []
            for execution_id, item in self._dirty.items():
                if isinstance(item, Execution):
                    entries.append(self._entry(item))
                    item.in_ledger = True
                elif execution_id in self._cancels:
                    entries.append(self._cancel_entry(execution_id, self._cancels[execution_id]))
                elif not item.startswith("cancel:"):
                    entries.append({"execution_id": execution_id, "stage": "ended"})
            self._since_checkpoint += len(entries)
        self._dirty.clear()
        settles, self._settled_by_record = tuple(self._settled_by_record), []
        self._seq += 1
        body = orjson.dumps(
            {
                "type": "ledger",
                "owner": self.owner,
                "epoch": self.epoch,
                "seq": self._seq,
                "checkpoint": checkpoint,
                "entries": entries,
            }
        )
        return LedgerWrite(self._seq, checkpoint, body, settles)

    # -- transitions ---------------------------------------------------------------------

    def _admit(self, now: float) -> None:
        while self.admitting and self._fifo:
            x = self._fifo[0]
            holder = self._keys.get(x.key) if x.key is not None else None
            if holder is not None and holder != x.execution_id:
                # Settled without a slot: a duplicate never runs, so it never waits.
                self._pop_head()
                self._finish(x, S.DEDUPLICATED, now, duplicate_of=holder, with_submission=True)
                continue
            wanted = self._cancels.pop(x.execution_id, None)
            if wanted is not None:
                self._pop_head()
                self._finish(
                    x,
                    S.CANCELLED,
                    now,
                    error=user_cancel(wanted.requested_by),
                    cancelled_by=wanted.requested_by,
                )
                continue
            if not self.has_slot():
                return
            self._pop_head()
            self._take_slot(x)
            assert x.envelope is not None  # pending executions always carry theirs
            x.deadline = now + x.envelope.run_timeout_seconds
            self._arm(x.deadline, _Timer.DEADLINE, x)
            self._send(x, now, announce=True)

    def _send(self, x: Execution, now: float, *, announce: bool) -> None:
        x.stage = Stage.DISPATCHED
        x.dispatch_id = self._new_id()
        x.dispatches += 1
        x.lease_until = x.worker_id = None
        x.unsent = False  # its record goes out before its work, in this flush
        self._ledger(x)
        assert x.deadline is not None
        self._effects.append(Dispatch(x, x.dispatch_id, x.deadline, x.dispatches, x.retries))
        if announce:
            self._effects.append(
                Emit(S.ADMITTED, x, dispatch_id=x.dispatch_id, with_submission=True, at=_at(now))
            )

    def _republish(self, x: Execution) -> None:
        """The same dispatch again: a dead owner may never have sent it."""
        if x.raw is None or x.dispatch_id is None or x.deadline is None:
            return  # its submission is on its way back to us
        x.republish = False
        self._effects.append(
            Dispatch(x, x.dispatch_id, x.deadline, max(1, x.dispatches), x.retries)
        )

    def _dispatch_again(self, x: Execution, now: float, *, announce: bool = True) -> None:
        """Its lease expired or its worker released it (or its retry is due): nobody
        runs it now."""
        if x.deadline is not None and x.deadline <= now:
            return  # its deadline timer ends it
        if x.raw is None:
            x.republish = True  # with a new id, once its submission is back
            x.unsent = True
            x.stage = Stage.DISPATCHED
            x.dispatch_id = self._new_id()
            x.dispatches += 1
            self._ledger(x)
            return
        self._send(x, now, announce=announce)

    def _schedule_retry(self, x: Execution, failed: Failed, now: float) -> bool:
        """A run failed and its worker's policy wants another: wait for it, if there is time.

        The execution keeps its slot and key while it waits; reports of the failed
        dispatch are stale from now on (no dispatch is current until the retry's).
        """
        if failed.retry_in is None:
            return False
        retry_at = now + failed.retry_in
        if x.deadline is not None and retry_at >= x.deadline:
            return False  # the run timeout covers every run: it ends failed now
        x.stage = Stage.WAITING_RETRY
        x.retry_at, x.retry_of = retry_at, x.dispatch_id
        self._effects.append(self._retry_event(x, failed, now))
        x.dispatch_id = x.lease_until = x.worker_id = x.started_at = None
        self._arm(retry_at, _Timer.RETRY, x)
        self._ledger(x)
        return True

    def _failed_again(self, x: Execution, failed: Failed, now: float) -> bool:
        """The report of the run a retry waits for, again: its owner died before it was
        acknowledged, maybe before its event was out. The event again (the store takes
        it once); nothing else changes."""
        if x.stage is not Stage.WAITING_RETRY or failed.dispatch_id != x.retry_of:
            return False
        self._effects.append(self._retry_event(x, failed, now))
        return True

    @staticmethod
    def _retry_event(x: Execution, failed: Failed, now: float) -> Emit:
        assert x.retry_at is not None
        return Emit(
            S.RUNNING,
            x,
            dispatch_id=x.retry_of,
            worker_id=failed.worker_id,
            error=failed.error,
            at=_at(now),
            started_at=failed.started_at or x.started_at,
            retry_count=x.retries,
            retry_at=_at(x.retry_at),
        )

    def _retry_due(self, x: Execution, now: float) -> None:
        if x.deadline is not None and x.deadline <= now:
            return  # its deadline timer ends it, with the retry it never got
        x.retries += 1
        x.retry_at = x.retry_of = None
        # No admitted event: it holds its slot since its admission (and a second one
        # would count as an admission in the metrics, with the latency of them all).
        self._dispatch_again(x, now, announce=False)

    def _cancel(self, x: Execution, requested_by: str, now: float) -> None:
        ran = x.holds_slot
        self._finish(
            x,
            S.CANCELLED,
            now,
            error=user_cancel(requested_by),
            cancelled_by=requested_by,
        )
        if ran:
            self._effects.append(SendCancel(x, "user"))

    def _stop_copy(
        self, execution_id: str, dispatch_id: str, worker_id: str, x: Execution | None
    ) -> None:
        subject = x or Execution(execution_id, 0, None, "", "", None, None, Stage.TERMINAL)
        self._effects.append(
            SendCancel(subject, "superseded", dispatch_id=dispatch_id, worker_id=worker_id)
        )

    def _release_submission(self, x: Execution) -> None:
        """Held long enough: its envelope goes to the ledger, its delivery is let go."""
        if x.submission is None or x.released:
            return
        x.released = True
        self._parked += x.stage is Stage.PENDING
        self._ledger(x)
        self._effects.append(Ack(x.submission))
        x.submission = None

    def _finish(
        self,
        x: Execution,
        status: ExecutionStatus,
        now: float,
        *,
        worker_id: str | None = None,
        result: Any = None,
        error: ErrorInfo | None = None,
        duplicate_of: str | None = None,
        with_submission: bool = False,
        cancelled_by: str | None = None,
        started_at: str | None = None,
        settles: Ref | None = None,
    ) -> None:
        """It ended: its slot and key are free at once; its end is recorded and the
        deliveries it settles (``settles``, its submission) are acknowledged only
        once the terminal event is confirmed (``on_announced``)."""
        was = x.stage
        if x.holds_slot:
            self._used -= 1
            if x.key is not None and self._keys.get(x.key) == x.execution_id:
                del self._keys[x.key]
        elif x.stage is Stage.PENDING and x in self._fifo:
            self._fifo.remove(x)
            self._parked -= x.released
        x.stage = Stage.TERMINAL
        self.executions.pop(x.execution_id, None)
        self._remember(x.execution_id, now)
        self._cancels.pop(x.execution_id, None)
        # What the ledger says of it stays until its event is out (see on_announced).
        self._dirty.pop(x.execution_id, None)
        refs = [x.submission] if x.submission is not None else []
        x.submission = None
        if settles is not None:
            refs.append(settles)
        self._ending[x.execution_id] = _Ending(x, was, refs)
        self._effects.append(
            Emit(
                status,
                x,
                dispatch_id=x.dispatch_id,
                worker_id=worker_id or x.worker_id,
                duplicate_of=duplicate_of,
                result=result,
                error=error,
                with_submission=with_submission,
                cancelled_by=cancelled_by,
                at=_at(now),
                started_at=started_at,
                terminal=True,
            )
        )

    # -- bookkeeping ---------------------------------------------------------------------

    def _pop_head(self) -> None:
        x = self._fifo.popleft()
        self._parked -= x.released

    def _take_slot(self, x: Execution) -> None:
        self._used += 1
        if x.key is not None and x.key not in self._keys:
            self._keys[x.key] = x.execution_id

    def _renew(self, x: Execution, now: float) -> None:
        x.lease_until = now + self.tunables.lease_seconds
        self._arm(x.lease_until, _Timer.LEASE, x)

    def _arm(self, when: float, kind: _Timer, x: Execution) -> None:
        heapq.heappush(self._timers, (when, kind.value, x.execution_id))

    def _timer_valid(self, item: tuple[float, str, str]) -> bool:
        when, kind, execution_id = item
        x = self.executions.get(execution_id)
        if x is None:
            return False
        if kind == _Timer.DEADLINE:
            return x.holds_slot and x.deadline == when
        if kind == _Timer.LEASE:
            return x.holds_slot and x.lease_until == when
        if kind == _Timer.RETRY:
            return x.stage is Stage.WAITING_RETRY and x.retry_at == when
        return x.submission is not None and not x.released and x.received_at <= when

    def _ledger(self, x: Execution) -> None:
        self._dirty[x.execution_id] = x
        self._dirty.move_to_end(x.execution_id)

    def _remember(self, execution_id: str, now: float) -> None:
        self._recent[execution_id] = now
        self._recent.move_to_end(execution_id)
        if len(self._recent) > RECENT_TERMINAL:
            self._recent.popitem(last=False)

    def _in_ledger_order(self) -> list[Execution]:
        # Pending ones in their queue order (a new owner keeps it), the rest after.
        pending = [x for x in self._fifo if x.released]
        return pending + [x for x in self.executions.values() if x.holds_slot]

    @staticmethod
    def _entry(x: Execution, stage_of: Stage | None = None) -> dict[str, Any]:
        at = stage_of or x.stage
        stage = at.value if at is not Stage.TERMINAL else "ended"
        entry: dict[str, Any] = {
            "execution_id": x.execution_id,
            "stage": stage,
            "dispatch_id": x.dispatch_id,
            "dispatch_count": x.dispatches,
            "deadline": x.deadline,
            "attempt": x.attempt,
            "concurrency_key": x.key,
            "workflow_id": x.workflow_id,
            "deployment_id": x.deployment_id,
        }
        if x.unsent and at is Stage.DISPATCHED:
            entry["unsent"] = True
        if x.retries:
            entry["retry_count"] = x.retries
        if x.retry_at is not None:
            entry["retry_at"] = x.retry_at
            entry["retry_of"] = x.retry_of
        if x.released and x.raw is not None:
            entry["submission"] = orjson.Fragment(x.raw)
        return entry

    @staticmethod
    def _cancel_entry(execution_id: str, wanted: _WantedCancel) -> dict[str, Any]:
        return {
            "execution_id": execution_id,
            "stage": "cancel",
            "requested_by": wanted.requested_by,
            "until": wanted.until,
        }
