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

Concurrency keys (``strategy``, the queue's, from the registry):

- ``deduplicate`` (the default): one FIFO under the limit; at its head, a key held
  by a slot ends the submission ``deduplicated`` (``duplicate_of`` the holder).
- ``partition``: the limit applies per key (no key: one partition of its own).
  Pending executions wait in one lane per key; a heap orders the keys that have a
  free slot by the arrival of their first pending one, so a full key never holds
  back the others (no head-of-line blocking), FIFO within a key, and an
  admission costs O(log keys).
- ``cancel_in_progress``: on arrival, a submission with a key cancels every older
  pending or slot-holding execution of that key (``cancelled``, ``cancelled_by``
  the newer id; its workers told to stop); one older than what is here ends so
  itself. Then one FIFO under the limit, as for ``deduplicate``.

Slots are counted per key whatever the strategy (``Admission``, in
``dispatcher/admission.py``, with the FIFO, lanes and heap), so a takeover
rebuilds them from the ledger's keys and a strategy change applies at once:
nothing in flight is stopped by one, pending executions are admitted by the new
rule.

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
How an entry is written and how the records fold is ``dispatcher/ledger.py``.

The values it speaks in (``Execution``, ``Stage``, ``Tunables``, the effects) are
``dispatcher/execution.py``, importable from here too.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from dispatcher import ledger
from dispatcher.admission import Admission
from dispatcher.execution import (
    Ack,
    Dispatch,
    Effect,
    Emit,
    Ending,
    Execution,
    LedgerWrite,
    Ref,
    SendCancel,
    Stage,
    TerminalResult,
    Timer,
    Tunables,
    WantedCancel,
    decided_at,
    superseded_by,
    user_cancel,
)
from schemas.dispatch import (
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
from schemas.ids import new_hex_id
from schemas.registry import DEFAULT_CONCURRENCY_STRATEGY, ConcurrencyStrategy

# What other modules and the tests import from here (defined in dispatcher/execution.py).
__all__ = [
    "Ack",
    "Dispatch",
    "Effect",
    "Emit",
    "Execution",
    "LedgerWrite",
    "QueueLifecycle",
    "Ref",
    "SendCancel",
    "Stage",
    "TerminalResult",
    "Tunables",
    "superseded_by",
    "user_cancel",
]

S = ExecutionStatus
# Terminal execution ids remembered, so a late report or redelivery of one is settled.
RECENT_TERMINAL = 4096
MIN_CHECKPOINT_ENTRIES = 64
# Records written between two checkpoints, at most: the owner holds each until the
# next checkpoint is confirmed, and they share the results consumer's prefetch with
# the workers' reports (QueueOwner.start counts them in), so they must not fill it.
MAX_RECORDS_BETWEEN_CHECKPOINTS = 512


class QueueLifecycle:
    """The executions of one submission queue, as its owner knows them."""

    def __init__(
        self,
        limit: int | None,
        tunables: Tunables,
        *,
        owner: str,
        strategy: ConcurrencyStrategy = DEFAULT_CONCURRENCY_STRATEGY,
        new_id: Callable[[], str] = new_hex_id,
    ) -> None:
        self._admission = Admission(limit, strategy)
        self.admitting = True
        self.tunables = tunables
        self.owner = owner
        self._new_id = new_id
        self.executions: dict[str, Execution] = {}  # every one not terminal
        self._recent: OrderedDict[str, float] = OrderedDict()  # terminal id -> when
        self._ending: dict[str, Ending] = {}  # terminal, its event not confirmed yet
        self._settled_by_record: list[Ref] = []  # acknowledged behind the next record
        self._ends_since: float | None = None  # when the oldest end not yet written was told
        self._cancels: dict[str, WantedCancel] = {}
        self._timers: list[tuple[float, str, str]] = []
        self._effects: list[Effect] = []
        # The ledger.
        self.epoch = 1
        self._seq = 0
        self._dirty: OrderedDict[str, Execution | str] = OrderedDict()  # str: a tombstone
        self._since_checkpoint = 0
        self._records_since_checkpoint = 0
        self._last_checkpoint_at = -math.inf
        self._want_checkpoint = True
        self._records = ledger.HeldRecords()

    # -- what the owner asks ------------------------------------------------------------

    @property
    def limit(self) -> int | None:
        return self._admission.limit

    @property
    def strategy(self) -> ConcurrencyStrategy:
        return self._admission.strategy

    @property
    def held(self) -> int:
        """Executions holding a slot."""
        return self._admission.held

    @property
    def pending(self) -> int:
        return self._admission.pending

    @property
    def parked(self) -> int:
        """Pending executions whose submission delivery was let go (kept in the ledger)."""
        return self._admission.parked

    @property
    def _ready(self) -> list[tuple[int, str | None]]:
        """partition's heap of the keys that may admit (its size is a test's bound)."""
        return self._admission.ready

    @property
    def busy(self) -> bool:
        return bool(self.executions) or bool(self._ending) or bool(self._settled_by_record)

    @property
    def announcing(self) -> int:
        """Executions ended whose terminal event is not confirmed yet."""
        return len(self._ending)

    def has_slot(self) -> bool:
        return self._admission.has_slot()

    def holding(self, key: str | None) -> int:
        """Executions with this concurrency key holding a slot (None: those without one)."""
        return self._admission.holding(key)

    def next_wakeup(self) -> float:
        """When ``tick`` has something to do (deadlines, leases, holds, the checkpoint)."""
        while self._timers and not self._timer_valid(self._timers[0]):
            heapq.heappop(self._timers)
        wake = self._last_checkpoint_at + self.tunables.hold_seconds / 2
        if self._timers:
            wake = min(wake, self._timers[0][0])
        if self._cancels:
            wake = min(wake, min(c.until for c in self._cancels.values()))
        if self._ends_since is not None:
            wake = min(wake, self._ends_since + self.tunables.ends_linger_seconds)
        return wake

    def take_effects(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    # -- inputs --------------------------------------------------------------------------

    def rebuild(self, records: Iterable[tuple[Ref, LedgerRecord]], now: float) -> None:
        """Fold the records of the owners before us (received before our probe)."""
        folded = ledger.fold(records, self._cancels)
        self._records.foreign(folded.refs)
        self._cancels = folded.cancels
        for execution_id in folded.ended:
            self._remember(execution_id, now)
        if folded.epoch is not None:
            self.epoch = folded.epoch + 1
        for entry in folded.entries:
            x = ledger.restore(entry)
            self.executions[x.execution_id] = x
            if x.stage is Stage.PENDING:
                self._admission.enqueue(x)
                continue
            self._admission.take_slot(x)
            if x.deadline is not None:
                self._arm(x.deadline, Timer.DEADLINE, x)
            if x.stage is Stage.WAITING_RETRY:
                # Due at the time its owner set (at once if that passed).
                x.retry_at = entry.retry_at if entry.retry_at is not None else now
                x.retry_of = entry.retry_of
                self._arm(x.retry_at, Timer.RETRY, x)
            elif x.stage is Stage.RUNNING:
                # Renewed from now: a lease is never shortened by a takeover.
                self._renew(x, now)
            elif x.execution_id in folded.unsure:
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
                self._arm(now + self.tunables.hold_seconds, Timer.HOLD, x)
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
        wanted = self._cancels.pop(execution_id, None)
        if wanted is not None:
            # Asked before it arrived: it never waits for its turn (nor its key's).
            self._finish(
                x,
                S.CANCELLED,
                now,
                error=user_cancel(wanted.requested_by),
                cancelled_by=wanted.requested_by,
            )
            return
        if self.strategy == "cancel_in_progress" and x.key is not None and self._supersede(x, now):
            return
        self._admission.enqueue(x)
        self._arm(now + self.tunables.hold_seconds, Timer.HOLD, x)
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
            self._cancels[execution_id] = WantedCancel(request.requested_by, now + wait)
            self._dirty[execution_id] = f"cancel:{execution_id}"
        self._effects.append(Ack(ref))

    def on_dispatch_failed(self, x: Execution, dispatch_id: str, error: str, now: float) -> None:
        """The work could not even be built (not the broker: that ends the session)."""
        if x.holds_slot and x.dispatch_id == dispatch_id:
            self._finish(x, S.FAILED, now, error=ErrorInfo(type="dispatch_error", message=error))
            self._admit(now)

    def on_own_record(self, ref: Ref, seq: int) -> None:
        if not self._records.hold(ref, seq):
            self._effects.append(Ack(ref))

    def on_ledger_written(self, write: LedgerWrite) -> list[Ack]:
        """The record is confirmed: after a checkpoint, the older records may go.

        Answered, not queued with the other effects: whatever was decided while the
        record was on its way belongs to the next flush, behind the next record.
        """
        acks = [Ack(ref) for ref in write.settles]
        if not write.checkpoint:
            return acks
        acks.extend(Ack(ref) for ref in self._records.checkpointed(write.seq))
        return acks

    def on_announced(self, executions: Iterable[Execution], now: float) -> None:
        """Their terminal events are confirmed: record their ends, then let go of
        the deliveries they settle (behind the record, if a record names them).

        The ends ride the next record; one of their own is written only after
        ``ends_linger_seconds`` or once ``ends_batch`` deliveries wait on it (at a
        steady rate there is an admission's record to ride on well before)."""
        for x in executions:
            ending = self._ending.pop(x.execution_id, None)
            if ending is None:
                continue
            if x.in_ledger:
                self._dirty[x.execution_id] = x.execution_id  # a tombstone
                self._settled_by_record.extend(ending.refs)
                if self._ends_since is None:
                    self._ends_since = now
            else:
                self._effects.extend(Ack(ref) for ref in ending.refs)

    def _ends_may_wait(self, now: float) -> bool:
        """Whether what is dirty is only ends that may wait for the next record."""
        if self._ends_since is None or not self.admitting:
            return False  # nothing waits while draining
        if now >= self._ends_since + self.tunables.ends_linger_seconds:
            return False
        if len(self._settled_by_record) >= self.tunables.ends_batch:
            return False
        return all(
            isinstance(item, str) and not item.startswith("cancel:")
            for item in self._dirty.values()
        )

    def set_limit(self, limit: int | None, now: float) -> None:
        self._admission.set_limit(limit)
        self._admit(now)

    def set_strategy(self, strategy: ConcurrencyStrategy, now: float) -> None:
        """From now on: executions in flight keep their slots whatever the new rule
        says (nothing is stopped by a change), pending ones are admitted by it."""
        if strategy == self.strategy:
            return
        self._admission.set_strategy(strategy)
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
            if kind == Timer.DEADLINE:
                timeout = x.run_timeout
                message = f"not finished within {timeout}s" if timeout else "deadline passed"
                self._finish(x, S.TIMED_OUT, now, error=ErrorInfo(type="timeout", message=message))
                self._effects.append(SendCancel(x, "timeout"))
            elif kind == Timer.LEASE:
                self._dispatch_again(x, now)
            elif kind == Timer.RETRY:
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
        # What a checkpoint would hold: the live state and the recent tombstones
        # (up to RECENT_TERMINAL). One is written once the deltas since the last
        # outweigh it, so its cost per change stays bounded whatever the rate: at
        # saturation the tombstones are most of it.
        size = len(self.executions) + len(self._cancels) + len(self._recent)
        checkpoint = (
            self._want_checkpoint
            or self._since_checkpoint + len(self._dirty) >= max(MIN_CHECKPOINT_ENTRIES, size)
            or self._records_since_checkpoint >= MAX_RECORDS_BETWEEN_CHECKPOINTS
            or now >= self._last_checkpoint_at + self.tunables.hold_seconds / 2
        )
        if not checkpoint and not self._dirty and not self._settled_by_record:
            return None
        if not checkpoint and self._ends_may_wait(now):
            return None
        if checkpoint:
            # Ends not announced yet stay as they were: a new owner hears of them again.
            entries = [
                ledger.entry(e.execution, e.was)
                for e in self._ending.values()
                if e.execution.in_ledger
            ]
            entries += [ledger.entry(x) for x in self._in_ledger_order()]
            entries += [ledger.cancel_entry(i, c) for i, c in self._cancels.items()]
            # Tombstones of recent ends: a submission whose acknowledgement was lost
            # in a crash must not run again.
            horizon = now - 2 * self.tunables.hold_seconds
            entries += [
                ledger.ended_entry(i)
                for i, at in self._recent.items()
                if at >= horizon and i not in self._ending
            ]
            for x in self.executions.values():
                x.in_ledger = True
            self._since_checkpoint = 0
            self._records_since_checkpoint = 0
            self._last_checkpoint_at = now
            self._want_checkpoint = False
        else:
            entries = []
            for execution_id, item in self._dirty.items():
                if isinstance(item, Execution):
                    entries.append(ledger.entry(item))
                    item.in_ledger = True
                elif execution_id in self._cancels:
                    entries.append(ledger.cancel_entry(execution_id, self._cancels[execution_id]))
                elif not item.startswith("cancel:"):
                    entries.append(ledger.ended_entry(execution_id))
            self._since_checkpoint += len(entries)
            self._records_since_checkpoint += 1
        self._dirty.clear()
        settles, self._settled_by_record = tuple(self._settled_by_record), []
        self._ends_since = None
        self._seq += 1
        body = ledger.encode_record(self.owner, self.epoch, self._seq, checkpoint, entries)
        return LedgerWrite(self._seq, checkpoint, body, settles)

    # -- transitions ---------------------------------------------------------------------

    def _admit(self, now: float) -> None:
        if self.strategy == "partition":
            self._admit_by_key(now)
        else:
            self._admit_in_order(now)

    def _admit_in_order(self, now: float) -> None:
        """One FIFO under the queue's limit (deduplicate, cancel_in_progress)."""
        dedup = self.strategy == "deduplicate"
        while self.admitting and (x := self._admission.head()) is not None:
            holder = self._admission.holder_of(x.key) if dedup and x.key is not None else None
            if holder is not None:
                # Settled without a slot: a duplicate never runs, so it never waits.
                self._admission.unqueue(x)
                self._finish(x, S.DEDUPLICATED, now, duplicate_of=holder, with_submission=True)
                continue
            if self._settle_wanted_cancel(x, now):
                continue
            if not self.has_slot():
                return
            self._admission.unqueue(x)
            self._start(x, now)

    def _admit_by_key(self, now: float) -> None:
        """partition: the limit applies per key, so a key with no free slot waits
        without holding back the others. Each admission is the earliest arrival
        among the first pending ones of the keys with a free slot (a heap of keys,
        O(log keys)); within a key, FIFO."""
        while self.admitting and (x := self._admission.next_by_key()) is not None:
            if not self._settle_wanted_cancel(x, now):
                self._admission.unqueue(x)
                self._start(x, now)
            self._admission.mark(x.key)

    def _settle_wanted_cancel(self, x: Execution, now: float) -> bool:
        """A cancel asked before the ledger of a takeover had it arrive: ended, unrun."""
        wanted = self._cancels.pop(x.execution_id, None)
        if wanted is None:
            return False
        self._admission.unqueue(x)
        self._finish(
            x,
            S.CANCELLED,
            now,
            error=user_cancel(wanted.requested_by),
            cancelled_by=wanted.requested_by,
        )
        return True

    def _start(self, x: Execution, now: float) -> None:
        self._admission.take_slot(x)
        assert x.envelope is not None  # pending executions always carry theirs
        x.deadline = now + x.envelope.run_timeout_seconds
        self._arm(x.deadline, Timer.DEADLINE, x)
        self._send(x, now, announce=True)

    def _supersede(self, x: Execution, now: float) -> bool:
        """cancel_in_progress: the newest execution of a key is the one that runs.

        Newest by execution id (UUIDv7: creation time), not by arrival, so a
        redelivered older submission never cancels the newer one. Every older one
        of the key, pending or holding a slot, ends ``cancelled`` naming ``x`` (its
        workers are told to stop); or ``x`` itself, if a newer one is here. True:
        ``x`` ended.
        """
        rivals = self._admission.of_key(x.key)
        newest = max(rivals, key=lambda r: r.execution_id, default=None)
        if newest is not None and newest.execution_id > x.execution_id:
            self._finish(
                x,
                S.CANCELLED,
                now,
                error=superseded_by(newest.execution_id),
                cancelled_by=newest.execution_id,
                with_submission=True,
            )
            return True
        for old in rivals:
            pending = old.stage is Stage.PENDING
            runs = old.stage in (Stage.DISPATCHED, Stage.RUNNING)  # not a waiting retry
            self._finish(
                old,
                S.CANCELLED,
                now,
                error=superseded_by(x.execution_id),
                cancelled_by=x.execution_id,
                with_submission=pending,
            )
            if runs:
                # Stop every copy and report nothing: it has ended here already.
                self._effects.append(SendCancel(old, "superseded"))
        return False

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
                Emit(
                    S.ADMITTED,
                    x,
                    dispatch_id=x.dispatch_id,
                    with_submission=True,
                    at=decided_at(now),
                )
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
        self._arm(retry_at, Timer.RETRY, x)
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
            at=decided_at(now),
            started_at=failed.started_at or x.started_at,
            retry_count=x.retries,
            retry_at=decided_at(x.retry_at),
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
        self._admission.released(x)
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
        self._admission.vacate(x)
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
        self._ending[x.execution_id] = Ending(x, was, refs)
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
                at=decided_at(now),
                started_at=started_at,
                terminal=True,
            )
        )

    # -- bookkeeping ---------------------------------------------------------------------

    def _renew(self, x: Execution, now: float) -> None:
        x.lease_until = now + self.tunables.lease_seconds
        self._arm(x.lease_until, Timer.LEASE, x)

    def _arm(self, when: float, kind: Timer, x: Execution) -> None:
        heapq.heappush(self._timers, (when, kind.value, x.execution_id))

    def _timer_valid(self, item: tuple[float, str, str]) -> bool:
        when, kind, execution_id = item
        x = self.executions.get(execution_id)
        if x is None:
            return False
        if kind == Timer.DEADLINE:
            return x.holds_slot and x.deadline == when
        if kind == Timer.LEASE:
            return x.holds_slot and x.lease_until == when
        if kind == Timer.RETRY:
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
        pending = [x for x in self._admission.queued() if x.released]
        return pending + [x for x in self.executions.values() if x.holds_slot]
