"""The lifecycle state machine, fed by hand: the orderings a broker cannot stage on demand.

Every test drives ``QueueLifecycle`` with explicit times and checks the effects
it answers: what is published, what is acknowledged, what the ledger says, and
what a new owner rebuilds from that ledger.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

import dispatcher.lifecycle as lifecycle_module
from dispatcher.lifecycle import (
    Ack,
    Dispatch,
    Effect,
    Emit,
    LedgerWrite,
    QueueLifecycle,
    SendCancel,
    Stage,
    Tunables,
)
from schemas.dispatch import (
    Cancelled,
    CancelRequest,
    Completed,
    ErrorInfo,
    ExecutionStatus,
    Failed,
    Heartbeat,
    HeartbeatEntry,
    LedgerRecord,
    Released,
)
from schemas.envelope import SubmissionEnvelope
from schemas.ids import rfc3339
from schemas.registry import ConcurrencyStrategy
from tests.envelopes import make_submission

S = ExecutionStatus
LEASE = 30.0
HOLD = 20.0
T0 = 1_000_000.0


def envelope(
    n: int, *, key: str | None = None, timeout: int = 3600
) -> tuple[SubmissionEnvelope, bytes]:
    raw = make_submission(
        execution_id=f"x{n}",
        created_at="2026-12-01T00:00:00Z",
        workflow_id="wf",
        deployment_id="d1",
        concurrency_key=key,
        run_timeout_seconds=timeout,
        payload={"n": n},
    )
    return SubmissionEnvelope.model_validate_json(raw), raw


@dataclass
class Harness:
    """A lifecycle plus what it said: effects by kind, the ledger as written."""

    limit: int | None = 2
    owner: str = "a"
    strategy: ConcurrencyStrategy = "deduplicate"
    ends_linger: float = 0.0
    lc: QueueLifecycle = field(init=False)
    refs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    effects: list[Effect] = field(default_factory=list)
    ledger: list[LedgerRecord] = field(default_factory=list)
    submissions: dict[str, int] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.lc = QueueLifecycle(
            self.limit,
            Tunables(lease_seconds=LEASE, hold_seconds=HOLD, ends_linger_seconds=self.ends_linger),
            owner=self.owner,
            strategy=self.strategy,
            new_id=lambda: f"d{next(self.ids)}",
        )

    def ref(self) -> int:
        return next(self.refs)

    def flush(self, now: float = T0, *, announce: bool = True) -> list[Effect]:
        """What the effector does until idle: take the effects, write the ledger record,
        confirm it; confirm the events (unless ``announce`` is false), and again."""
        out: list[Effect] = []
        while True:
            effects = self.lc.take_effects()
            write = self.lc.take_ledger(now)
            if write is not None:
                self._record(write)
                effects += self.lc.on_ledger_written(write)
            if not effects and write is None:
                break
            out += effects
            if announce:
                self.lc.on_announced(
                    (e.execution for e in effects if isinstance(e, Emit) and e.terminal), now
                )
        self.effects += out
        return out

    def _record(self, write: LedgerWrite) -> None:
        self.ledger.append(LedgerRecord.model_validate_json(write.body))

    def submit(
        self,
        n: int,
        now: float = T0,
        *,
        key: str | None = None,
        attempt: int = 0,
        timeout: int = 3600,
    ) -> int:
        env, raw = envelope(n, key=key, timeout=timeout)
        ref = self.ref()
        self.submissions[env.execution_id] = ref
        self.lc.on_submission(ref, env, raw, attempt, now)
        return ref

    def heartbeat(
        self, n: int, dispatch: str, now: float, *, worker: str = "w1", redelivered: bool = False
    ) -> int:
        ref = self.ref()
        entry = HeartbeatEntry(
            execution_id=f"x{n}", dispatch_id=dispatch, started_at="t", redelivered=redelivered
        )
        self.lc.on_heartbeat(ref, Heartbeat(worker_id=worker, at="t", executions=[entry]), now)
        return ref

    def complete(self, n: int, dispatch: str, now: float, *, worker: str = "w1") -> int:
        ref = self.ref()
        result = Completed(
            execution_id=f"x{n}",
            dispatch_id=dispatch,
            worker_id=worker,
            at="t",
            started_at="s",
            result={"ok": n},
        )
        self.lc.on_result(ref, result, now)
        return ref

    def fail(
        self,
        n: int,
        dispatch: str,
        now: float,
        *,
        retry_in: float | None = None,
        worker: str = "w1",
        message: str = "boom",
    ) -> int:
        ref = self.ref()
        failed = Failed(
            execution_id=f"x{n}",
            dispatch_id=dispatch,
            worker_id=worker,
            at="t",
            started_at="s",
            error=ErrorInfo(type="E", message=message),
            retry_in=retry_in,
        )
        self.lc.on_result(ref, failed, now)
        return ref

    # -- reading what it said --------------------------------------------------------------

    def dispatches(self) -> list[tuple[str, str]]:
        return [
            (e.execution.execution_id, e.dispatch_id)
            for e in self.effects
            if isinstance(e, Dispatch)
        ]

    def events(self, n: int | None = None) -> list[S]:
        return [
            e.status
            for e in self.effects
            if isinstance(e, Emit) and (n is None or e.execution.execution_id == f"x{n}")
        ]

    def emitted(self, n: int, status: S) -> Emit:
        return next(
            e
            for e in self.effects
            if isinstance(e, Emit) and e.execution.execution_id == f"x{n}" and e.status is status
        )

    def events_of(self, n: int) -> list[Emit]:
        return [
            e for e in self.effects if isinstance(e, Emit) and e.execution.execution_id == f"x{n}"
        ]

    def acked(self) -> set[int]:
        return {e.ref for e in self.effects if isinstance(e, Ack)}

    def cancels(self) -> list[tuple[str, str, str | None, str | None]]:
        return [
            (e.execution.execution_id, e.reason, e.dispatch_id, e.worker_id)
            for e in self.effects
            if isinstance(e, SendCancel)
        ]

    def sent(self, n: int) -> list[Dispatch]:
        return [
            e
            for e in self.effects
            if isinstance(e, Dispatch) and e.execution.execution_id == f"x{n}"
        ]

    def dispatch_of(self, n: int) -> str:
        return [d for x, d in self.dispatches() if x == f"x{n}"][-1]

    def successor(self, now: float, owner: str = "b", limit: int | None = None) -> Harness:
        """A new owner, rebuilt from every record this one wrote (all held, as on a crash)."""
        nxt = Harness(
            limit=self.limit if limit is None else limit, owner=owner, strategy=self.strategy
        )
        nxt.lc.rebuild([(nxt.ref(), r) for r in self.ledger], now)
        return nxt


# -- admission, dedup, limits -----------------------------------------------------------------


def test_admits_up_to_the_limit_in_order_and_the_next_when_one_ends() -> None:
    h = Harness(limit=2)
    for n in (1, 2, 3):
        h.submit(n)
    h.flush()
    assert h.dispatches() == [("x1", "d1"), ("x2", "d2")]
    assert h.events() == [S.ADMITTED, S.ADMITTED]
    assert h.lc.held == 2
    assert h.lc.pending == 1
    result = h.complete(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    assert h.dispatches()[-1] == ("x3", "d3")
    assert h.events(1) == [S.ADMITTED, S.COMPLETED]
    # The submission and the result are acknowledged once its end is in the ledger.
    assert {h.submissions["x1"], result} <= h.acked()
    assert h.ledger[-1].entries[-1].stage in ("dispatched", "ended")


def test_a_duplicate_key_ends_deduplicated_at_once_without_waiting_for_a_slot() -> None:
    h = Harness(limit=1)
    h.submit(1, key="k")
    h.submit(2, key="k")
    h.submit(3, key="other")
    h.flush()
    assert h.events(2) == [S.DEDUPLICATED]
    assert h.emitted(2, S.DEDUPLICATED).duplicate_of == "x1"
    assert h.submissions["x2"] in h.acked()
    assert h.lc.pending == 1  # x3 waits for the slot, x2 never does
    h.complete(1, "d1", T0 + 1)
    h.submit(4, T0 + 1, key="k")  # the key is free once its holder ended
    h.flush(T0 + 1)
    assert h.dispatches() == [("x1", "d1"), ("x3", "d2")]
    assert h.lc.pending == 1
    assert h.events(4) == []


def test_a_decision_carries_the_attempt_of_the_delivery_it_was_made_on() -> None:
    h = Harness(limit=1)
    h.submit(1, key="k")
    h.submit(2, key="k", attempt=3)
    h.flush()
    assert h.emitted(2, S.DEDUPLICATED).execution.attempt == 3


def test_a_lower_limit_admits_nothing_until_below_it_and_a_higher_one_admits_at_once() -> None:
    h = Harness(limit=3)
    for n in range(1, 6):
        h.submit(n)
    h.flush()
    h.lc.set_limit(1, T0)
    h.complete(1, "d1", T0)
    h.flush()
    assert len(h.dispatches()) == 3
    h.lc.set_limit(4, T0)
    h.flush()
    assert len(h.dispatches()) == 5


# -- reports, results, leases -----------------------------------------------------------------


def test_the_first_heartbeat_is_running_and_renewals_keep_the_lease() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    beat = h.heartbeat(1, "d1", T0 + 0.05)
    h.flush(T0 + 0.05)
    assert h.events(1) == [S.ADMITTED, S.RUNNING]
    assert beat in h.acked()
    assert h.ledger[-1].entries[-1].stage == "running"  # a new owner knows it is leased
    for k in range(1, 6):  # every third of the lease, for five leases
        h.heartbeat(1, "d1", T0 + k * LEASE / 3)
        h.lc.tick(T0 + k * LEASE / 3 + 1)
        h.flush(T0 + k * LEASE / 3 + 1)
    assert h.dispatches() == [("x1", "d1")]
    assert h.lc.held == 1


def test_an_expired_lease_dispatches_again_and_the_old_copy_is_told_to_stop() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    h.lc.tick(T0 + 1 + LEASE - 0.01)
    h.flush(T0 + 1 + LEASE - 0.01)
    assert h.dispatches() == [("x1", "d1")]  # not a moment before the lease ends
    h.lc.tick(T0 + 1 + LEASE)
    h.flush(T0 + 1 + LEASE)
    assert h.dispatches() == [("x1", "d1"), ("x1", "d2")]
    assert h.lc.held == 1  # one slot all along
    # The partitioned worker comes back and reports its stale copy: told to stop.
    h.heartbeat(1, "d1", T0 + 40)
    h.flush(T0 + 40)
    assert h.cancels() == [("x1", "superseded", "d1", "w1")]
    stale = h.complete(1, "d1", T0 + 41)
    h.flush(T0 + 41)
    assert stale in h.acked()
    assert h.events(1)[-1] is not S.COMPLETED
    h.complete(1, "d2", T0 + 42, worker="w2")
    h.flush(T0 + 42)
    assert h.events(1)[-1] is S.COMPLETED
    assert h.lc.held == 0


def test_a_released_dispatch_is_dispatched_again_at_once() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    ref = h.ref()
    h.lc.on_released(
        ref,
        Released(execution_id="x1", dispatch_id="d1", worker_id="w1", at="t", reason="shutdown"),
        T0 + 2,
    )
    h.flush(T0 + 2)
    assert h.dispatches() == [("x1", "d1"), ("x1", "d2")]
    assert ref in h.acked()


def test_a_second_worker_reporting_the_same_dispatch_is_stopped_unless_redelivered() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1, worker="w1")
    h.heartbeat(1, "d1", T0 + 2, worker="w2")
    h.flush(T0 + 2)
    assert h.cancels() == [("x1", "superseded", "d1", "w2")]
    # A broker redelivery (w1 died holding it unacknowledged) moves it to w3.
    h.heartbeat(1, "d1", T0 + 3, worker="w3", redelivered=True)
    h.flush(T0 + 3)
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.RUNNING]
    assert h.emitted(1, S.RUNNING).worker_id == "w1"
    # The older copy (its ack lost with its link) is stopped at its next beat.
    h.heartbeat(1, "d1", T0 + 4, worker="w1")
    h.flush(T0 + 4)
    stops = h.cancels()
    assert stops[-1] == ("x1", "superseded", "d1", "w1")
    h.heartbeat(1, "d1", T0 + 5, worker="w3")
    h.flush(T0 + 5)
    assert h.cancels() == stops  # w3 runs on


def test_duplicate_and_late_reports_change_nothing() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.complete(1, "d1", T0 + 1)
    again = h.complete(1, "d1", T0 + 2)
    late_beat = h.heartbeat(1, "d1", T0 + 3)
    h.flush(T0 + 3)
    assert h.events(1) == [S.ADMITTED, S.COMPLETED]
    assert {again, late_beat} <= h.acked()
    assert h.cancels() == [("x1", "superseded", "d1", "w1")]  # a copy still running: stop


def test_the_deadline_times_it_out_and_a_result_after_it_is_ignored() -> None:
    h = Harness()
    h.submit(1, timeout=10)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.lc.tick(T0 + 10)
    h.flush(T0 + 10)
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.TIMED_OUT]
    assert ("x1", "timeout", None, None) in h.cancels()
    late = h.complete(1, "d1", T0 + 11)
    h.flush(T0 + 11)
    assert late in h.acked()
    assert h.events(1)[-1] is S.TIMED_OUT


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (
            Failed(
                execution_id="x1",
                dispatch_id="d1",
                worker_id="w",
                at="t",
                error=ErrorInfo(type="E", message="m"),
            ),
            S.FAILED,
        ),
        (
            Cancelled(execution_id="x1", dispatch_id="d1", worker_id="w", at="t", reason="timeout"),
            S.TIMED_OUT,
        ),
        (
            Cancelled(execution_id="x1", dispatch_id="d1", worker_id="w", at="t", reason="user"),
            S.CANCELLED,
        ),
    ],
)
def test_worker_outcomes_map_to_terminal_statuses(result: Any, status: S) -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.lc.on_result(h.ref(), result, T0 + 1)
    h.flush(T0 + 1)
    assert h.events(1) == [S.ADMITTED, status]
    assert h.lc.held == 0


def test_a_short_run_without_a_running_report_still_says_when_it_started() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.complete(1, "d1", T0 + 0.01)
    h.flush(T0 + 0.01)
    assert h.emitted(1, S.COMPLETED).started_at == "s"


# -- cancels -------------------------------------------------------------------------------------


def _cancel(h: Harness, n: int, now: float, seen: S | None = S.QUEUED) -> int:
    ref = h.ref()
    h.lc.on_cancel_request(
        ref,
        CancelRequest(execution_id=f"x{n}", requested_by="key1", at="t", seen_status=seen),
        now,
    )
    return ref


def test_cancel_before_the_submission_arrives_ends_it_cancelled_without_running() -> None:
    h = Harness()
    request = _cancel(h, 1, T0)
    h.flush()
    assert request in h.acked()  # kept in the ledger instead of held
    assert h.ledger[-1].entries[-1].stage == "cancel"
    h.submit(1, T0 + 1)
    h.flush(T0 + 1)
    assert h.events(1) == [S.CANCELLED]
    assert h.dispatches() == []
    assert h.cancels() == []
    assert h.emitted(1, S.CANCELLED).cancelled_by == "key1"


def test_cancel_of_a_pending_one_never_runs_it_and_of_a_running_one_tells_its_worker() -> None:
    h = Harness(limit=1)
    h.submit(1)
    h.submit(2)
    h.flush()
    _cancel(h, 2, T0 + 1)
    h.flush(T0 + 1)
    assert h.events(2) == [S.CANCELLED]
    assert h.cancels() == []
    _cancel(h, 1, T0 + 2, seen=S.RUNNING)
    h.flush(T0 + 2)
    assert h.events(1) == [S.ADMITTED, S.CANCELLED]
    assert h.cancels() == [("x1", "user", None, None)]
    assert h.lc.held == 0


def test_cancel_after_the_end_is_acknowledged_and_forgotten() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.complete(1, "d1", T0 + 1)
    ref = _cancel(h, 1, T0 + 2)
    h.flush(T0 + 2)
    assert ref in h.acked()
    assert h.events(1) == [S.ADMITTED, S.COMPLETED]


def test_a_wanted_cancel_expires_after_its_wait() -> None:
    h = Harness()
    _cancel(h, 1, T0, seen=S.RUNNING)  # not queued: the short wait
    h.lc.tick(T0 + 11)
    h.flush(T0 + 11)
    h.submit(1, T0 + 12)
    h.flush(T0 + 12)
    assert h.events(1) == [S.ADMITTED]


# -- holding bounds ------------------------------------------------------------------------------


def test_no_delivery_is_held_longer_than_the_hold_bound() -> None:
    h = Harness(limit=1)
    h.submit(1)
    h.submit(2)  # waits for the slot
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    for t in range(2, 200):  # a 200 s run, a heartbeat every 10 s
        now = T0 + t
        if t % 10 == 0:
            h.heartbeat(1, "d1", now)
        h.lc.tick(now)
        h.flush(now)
    assert {h.submissions["x1"], h.submissions["x2"]} <= h.acked()
    assert h.lc.parked == 1
    # The ledger was renewed all along (checkpoints at most every hold/2), and it
    # carries both envelopes, since their deliveries are gone.
    checkpoints = [r for r in h.ledger if r.checkpoint]
    assert len(checkpoints) >= 2 * 200 // HOLD - 2
    last = {e.execution_id: e for e in checkpoints[-1].entries}
    assert last["x1"].stage == "running"
    assert last["x1"].submission is not None
    assert last["x2"].stage == "pending"
    assert last["x2"].submission is not None


@pytest.mark.parametrize("recent", [64, 512])
def test_only_the_newest_records_are_held_and_older_ones_are_acknowledged(
    monkeypatch: pytest.MonkeyPatch, recent: int
) -> None:
    monkeypatch.setattr(lifecycle_module, "RECENT_TERMINAL", recent)
    h = Harness()
    own: list[int] = []
    held: list[int] = []
    for n in range(1, 6 * recent):
        h.submit(n)
        h.flush()
        h.complete(n, f"d{n}", T0)
        h.flush()
        for record in h.ledger[len(own) :]:  # each record comes back to its owner
            ref = h.ref()
            own.append(ref)
            h.lc.on_own_record(ref, record.seq)
        held.append(len(set(own) - h.acked()))
    assert len(own) > 10 * recent
    # Bounded by the checkpoint cadence: a checkpoint once the changes since the
    # last outweigh what it holds (here the tombstones), not growing with the run.
    assert max(held) <= recent + 8
    assert max(held[-recent:]) > recent // 4  # records are held between checkpoints


def test_records_held_between_checkpoints_never_fill_the_results_prefetch() -> None:
    """At a low rate every execution is a record or two: however little each holds,
    a checkpoint comes once MAX_RECORDS_BETWEEN_CHECKPOINTS were written, so the
    owner's held records leave the workers' reports their room in the prefetch."""
    h = Harness()
    own: list[int] = []
    held = 0
    for n in range(1, 3000):
        h.submit(n)
        h.flush()
        h.complete(n, f"d{n}", T0)
        h.flush()
        for record in h.ledger[len(own) :]:
            ref = h.ref()
            own.append(ref)
            h.lc.on_own_record(ref, record.seq)
        held = max(held, len(set(own) - h.acked()))
    assert len(own) > 4000
    assert held <= lifecycle_module.MAX_RECORDS_BETWEEN_CHECKPOINTS + 2


def test_a_checkpoint_costs_a_bounded_share_of_each_execution_at_any_rate() -> None:
    """At saturation the tombstones of recent ends are most of a checkpoint; one is
    written only once the deltas outweigh it, so the entries written per execution
    stay a small constant instead of growing with the tombstones kept."""
    h = Harness(limit=None)
    n = 0
    for _ in range(300):  # 300 flushes of 40 executions each, as at saturation
        batch = range(n + 1, n + 41)
        for i in batch:
            h.submit(i)
        h.flush()
        for i in batch:
            h.complete(i, f"d{i}", T0)
        h.flush()
        n += 40
    written = sum(len(r.entries) for r in h.ledger)
    assert any(r.checkpoint for r in h.ledger)
    # An admission and a tombstone each, plus the checkpoints' share (<= 1 more per
    # change by the cadence rule); the old cadence (every 64 changes, up to 4,096
    # tombstones each) wrote ~50 entries per execution here.
    assert written / n <= 4.5


# -- takeover: a new owner rebuilds from the ledger ------------------------------------------------


def test_a_new_owner_keeps_in_flight_slots_and_leases_and_dispatches_nothing_again() -> None:
    h = Harness(limit=2)
    for n in (1, 2, 3):
        h.submit(n)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    # One more flush so nothing of the dead owner's last record is in doubt.
    h.complete(2, "d2", T0 + 2)
    h.flush(T0 + 2)
    h.heartbeat(3, "d3", T0 + 3)
    h.flush(T0 + 3)
    b = h.successor(T0 + 10)
    assert b.lc.held == 2
    assert b.lc.epoch == 2
    # The held submissions come back; they are in flight already.
    for n in (1, 3):
        b.submit(n, T0 + 10, attempt=1)
    b.submit(2, T0 + 10, attempt=1)  # ended: its acknowledgement was lost
    b.submit(4, T0 + 10)
    b.flush(T0 + 10)
    assert b.dispatches() == []  # x4 waits: both slots are held
    assert b.submissions["x2"] in b.acked()
    # Leases run from the takeover, never shorter.
    b.lc.tick(T0 + 10 + LEASE - 1)
    b.flush(T0 + 10 + LEASE - 1)
    assert b.dispatches() == []
    b.heartbeat(1, "d1", T0 + 12)
    b.lc.tick(T0 + 10 + LEASE)
    b.flush(T0 + 10 + LEASE)
    assert b.dispatches() == [("x3", "d1")]  # x3's lease expired: again, with a new id
    assert b.lc.held == 2


def test_a_result_that_arrives_before_the_submission_after_a_takeover_settles_it() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    b = h.successor(T0 + 5)
    b.complete(1, "d1", T0 + 5)
    b.flush(T0 + 5)
    assert b.events(1) == [S.COMPLETED]
    assert b.lc.held == 0
    late = b.submit(1, T0 + 6, attempt=1)
    b.flush(T0 + 6)
    assert late in b.acked()
    assert b.dispatches() == []


def test_a_dead_owners_last_dispatch_gets_a_lease_and_is_sent_again_if_nobody_reports() -> None:
    h = Harness()
    h.submit(1)
    h.flush()  # the record of the admission is out; whether its work was is unknown
    b = h.successor(T0 + 1)
    b.submit(1, T0 + 1, attempt=1)
    b.flush(T0 + 1)
    assert b.dispatches() == []
    b.lc.tick(T0 + 1 + LEASE)
    b.flush(T0 + 1 + LEASE)
    assert b.dispatches() == [("x1", "d1")]


def test_the_deadline_holds_across_a_takeover() -> None:
    h = Harness()
    h.submit(1, timeout=30)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    b = h.successor(T0 + 20)
    b.lc.tick(T0 + 30)
    b.flush(T0 + 30)
    assert b.events(1) == [S.TIMED_OUT]
    assert ("x1", "timeout", None, None) in b.cancels()


def test_pending_submissions_parked_in_the_ledger_keep_their_place_after_a_takeover() -> None:
    h = Harness(limit=1)
    for n in (1, 2, 3):
        h.submit(n)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    h.lc.tick(T0 + HOLD)
    h.flush(T0 + HOLD)  # x2 and x3 parked: their deliveries are gone
    h.lc.tick(T0 + HOLD + 1)
    h.flush(T0 + HOLD + 1)
    b = h.successor(T0 + HOLD + 2)
    assert b.lc.pending == 2
    b.complete(1, "d1", T0 + HOLD + 3)
    b.flush(T0 + HOLD + 3)
    assert b.dispatches() == [("x2", "d1")]


def test_a_cancel_kept_in_the_ledger_survives_a_takeover() -> None:
    h = Harness()
    _cancel(h, 1, T0)
    h.flush()
    b = h.successor(T0 + 1)
    b.submit(1, T0 + 2)
    b.flush(T0 + 2)
    assert b.events(1) == [S.CANCELLED]


def test_records_of_several_dead_owners_fold_in_epoch_order() -> None:
    a = Harness(limit=1)
    a.submit(1)
    a.flush()
    a.heartbeat(1, "d1", T0 + 1)
    a.flush(T0 + 1)
    b = a.successor(T0 + 2)  # b dies before its first checkpoint: a's records stay
    b.complete(1, "d1", T0 + 3)
    b.flush(T0 + 3)
    c = Harness(limit=1, owner="c")
    c.lc.rebuild([(c.ref(), r) for r in a.ledger + b.ledger], T0 + 4)
    assert c.lc.held == 0
    assert c.lc.epoch == 3
    assert c.submit(1, T0 + 5, attempt=2) in (c.flush(T0 + 5) and c.acked())


def test_ledger_records_are_compact_json_with_the_envelope_only_when_needed() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    entry = h.ledger[-1].entries[-1]
    assert entry.submission is None
    assert entry.stage == "dispatched"
    assert b"payload" not in orjson.dumps(h.ledger[-1].model_dump())
    assert h.lc.executions["x1"].stage is Stage.DISPATCHED


def test_what_is_decided_while_a_record_is_on_its_way_waits_for_the_next_record() -> None:
    # A dispatch must never go out before the record that names it is confirmed: a
    # new owner would not know it and dispatch it again (seen under kill -9).
    h = Harness()
    h.submit(1)
    first = h.lc.take_effects()
    write = h.lc.take_ledger(T0)
    assert write is not None
    h.submit(2)  # arrives while the record is being confirmed
    after = h.lc.on_ledger_written(write)
    assert all(isinstance(e, Ack) for e in after)
    assert [e.execution.execution_id for e in first if isinstance(e, Dispatch)] == ["x1"]
    following = h.lc.take_effects()
    second = h.lc.take_ledger(T0)
    assert second is not None
    assert [e.execution.execution_id for e in following if isinstance(e, Dispatch)] == ["x2"]
    assert "x2" in second.body.decode()


# -- retries -------------------------------------------------------------------------------------


def test_a_failed_run_asking_for_a_retry_waits_with_its_slot_then_goes_out_again() -> None:
    h = Harness(limit=1)
    h.submit(1)
    h.submit(2)
    h.flush()
    report = h.fail(1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    assert report in h.acked()
    assert h.events(1) == [S.ADMITTED, S.RUNNING]  # not failed: it is not over
    retry = h.events_of(1)[-1]
    assert (retry.retry_count, retry.retry_at, retry.dispatch_id) == (
        0,
        rfc3339(int((T0 + 6) * 1e9)),
        "d1",
    )
    assert retry.error == ErrorInfo(type="E", message="boom")
    entry = h.ledger[-1].entries[-1]
    assert (entry.stage, entry.retry_at, entry.dispatch_id) == ("waiting_retry", T0 + 6, None)
    assert h.lc.held == 1  # the slot stays held: x2 waits
    h.lc.tick(T0 + 5.99)
    h.flush(T0 + 5.99)
    assert h.dispatches() == [("x1", "d1")]
    assert h.lc.next_wakeup() == T0 + 6
    h.lc.tick(T0 + 6)
    h.flush(T0 + 6)
    again = h.sent(1)[-1]
    assert (again.dispatch_id, again.count, again.retry_count) == ("d2", 2, 1)
    assert h.events(1) == [S.ADMITTED, S.RUNNING]  # a retry is no new admission
    assert h.ledger[-1].entries[-1].retry_count == 1
    h.fail(1, "d2", T0 + 7, retry_in=1)
    h.lc.tick(T0 + 8)
    h.complete(1, "d3", T0 + 9)
    h.flush(T0 + 9)
    assert h.events(1)[-1] is S.COMPLETED
    assert h.emitted(1, S.COMPLETED).execution.retries == 2
    assert h.dispatches()[-1] == ("x2", "d4")  # only now


def test_a_failed_run_without_a_retry_or_out_of_time_for_one_ends_failed_at_once() -> None:
    h = Harness()
    h.submit(1)
    h.submit(2, timeout=10)
    h.flush()
    h.fail(1, "d1", T0 + 1)  # its policy has no retry left (or it raised NonRetryableError)
    h.fail(2, "d2", T0 + 6, retry_in=4)  # due exactly at the deadline: none
    h.flush(T0 + 6)
    assert h.events(1) == [S.ADMITTED, S.FAILED]
    assert h.events(2) == [S.ADMITTED, S.FAILED]
    assert h.emitted(2, S.FAILED).error == ErrorInfo(type="E", message="boom")
    assert h.lc.held == 0
    assert h.dispatches() == [("x1", "d1"), ("x2", "d2")]


def test_a_waiting_retry_keeps_its_key_so_a_duplicate_is_still_deduplicated() -> None:
    h = Harness(limit=2)
    h.submit(1, key="k")
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    h.submit(2, T0 + 2, key="k")
    h.flush(T0 + 2)
    assert h.events(2) == [S.DEDUPLICATED]
    assert h.emitted(2, S.DEDUPLICATED).duplicate_of == "x1"


def test_a_cancel_during_the_retry_wait_ends_it_and_the_retry_never_goes_out() -> None:
    h = Harness(limit=1)
    h.submit(1)
    h.submit(2)
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    _cancel(h, 1, T0 + 2, seen=S.RUNNING)
    h.flush(T0 + 2)
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.CANCELLED]
    assert h.dispatches() == [("x1", "d1"), ("x2", "d2")]  # its slot went to x2 at once
    h.lc.tick(T0 + 6)
    h.flush(T0 + 6)
    assert len(h.sent(1)) == 1
    assert h.ledger[-1].entries[-1].stage in ("ended", "dispatched")


def test_the_deadline_ends_a_retry_wait_its_owner_was_late_for() -> None:
    # The retry was due before the deadline, but the owner (stalled, or a takeover
    # after both) looks only once both passed: the deadline wins, nothing goes out.
    h = Harness()
    h.submit(1, timeout=10)
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    h.lc.tick(T0 + 12)
    h.flush(T0 + 12)
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.TIMED_OUT]
    assert h.emitted(1, S.TIMED_OUT).execution.retries == 0  # the retry never began
    assert h.dispatches() == [("x1", "d1")]
    assert h.lc.held == 0
    b = Harness()
    b.submit(1, timeout=10)
    b.flush()
    b.fail(1, "d1", T0 + 1, retry_in=5)
    b.flush(T0 + 1)
    c = b.successor(T0 + 11)
    c.lc.tick(T0 + 11)
    c.flush(T0 + 11)
    assert c.events(1) == [S.TIMED_OUT]
    assert c.dispatches() == []


def test_a_retry_survives_a_takeover_and_goes_out_when_its_owner_set_it() -> None:
    h = Harness(limit=1)
    h.submit(1)
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    b = h.successor(T0 + 2)
    assert b.lc.held == 1
    assert b.lc.executions["x1"].stage is Stage.WAITING_RETRY
    b.submit(1, T0 + 2, attempt=1)  # its held submission, returned
    b.submit(2, T0 + 2)
    b.flush(T0 + 2)
    assert b.dispatches() == []
    b.lc.tick(T0 + 6)
    b.flush(T0 + 6)
    assert [(d.dispatch_id, d.retry_count) for d in b.sent(1)] == [("d1", 1)]
    assert b.lc.held == 1


def test_a_retry_due_before_its_submission_is_back_goes_out_once_it_is() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    b = h.successor(T0 + 10)  # the retry was due while nobody owned the queue
    b.lc.tick(T0 + 10)
    b.flush(T0 + 10)
    assert b.dispatches() == []  # nothing to send yet: the envelope is in the broker
    b.submit(1, T0 + 11, attempt=1)
    b.flush(T0 + 11)
    assert [(d.count, d.retry_count) for d in b.sent(1)] == [(2, 1)]
    b.complete(1, b.dispatch_of(1), T0 + 12)
    b.flush(T0 + 12)
    assert b.events(1)[-1] is S.COMPLETED


def test_late_reports_of_the_failed_run_change_nothing() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    again = h.fail(1, "d1", T0 + 2, retry_in=5)  # its report, published twice
    h.heartbeat(1, "d1", T0 + 2)  # a second copy of d1, still running somewhere
    h.flush(T0 + 2)
    assert again in h.acked()
    # The same retry announced again (the store keeps it once), nothing else changes.
    first, repeat = h.events_of(1)[1:]
    assert (repeat.status, repeat.retry_count, repeat.retry_at) == (
        first.status,
        first.retry_count,
        first.retry_at,
    )
    assert h.lc.executions["x1"].retry_at == T0 + 6
    assert h.cancels() == [("x1", "superseded", "d1", "w1")]
    h.lc.tick(T0 + 6)
    late = h.complete(1, "d1", T0 + 7)
    h.flush(T0 + 7)
    assert late in h.acked()
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.RUNNING]
    assert h.dispatch_of(1) == "d2"
    h.complete(1, "d2", T0 + 8)
    h.flush(T0 + 8)
    assert h.events(1)[-1] is S.COMPLETED


# -- an end is recorded only once its event is out ----------------------------------------


def _ended(record: LedgerRecord) -> set[str]:
    return {e.execution_id for e in record.entries if e.stage == "ended"}


def test_an_end_is_recorded_and_settled_only_after_its_terminal_event_is_confirmed() -> None:
    h = Harness(limit=2)
    h.submit(1)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    result = h.complete(1, "d1", T0 + 2)
    h.flush(T0 + 2, announce=False)
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.COMPLETED]
    assert h.lc.held == 0  # the slot is free at once
    assert {h.submissions["x1"], result}.isdisjoint(h.acked())
    # A checkpoint meanwhile still names it as running, not as ended.
    h.lc.tick(T0 + HOLD)
    h.flush(T0 + HOLD, announce=False)
    assert h.ledger[-1].checkpoint
    assert [(e.execution_id, e.stage) for e in h.ledger[-1].entries] == [("x1", "running")]
    # Confirmed: the end goes into the next record, the deliveries behind it.
    h.lc.on_announced([h.emitted(1, S.COMPLETED).execution], T0 + HOLD)
    assert h.lc.take_effects() == []
    write = h.lc.take_ledger(T0 + HOLD + 1)
    assert write is not None
    assert _ended(LedgerRecord.model_validate_json(write.body)) == {"x1"}
    assert set(write.settles) == {h.submissions["x1"], result}
    assert set(h.lc.on_ledger_written(write)) == {Ack(h.submissions["x1"]), Ack(result)}


def test_an_owner_lost_before_its_terminal_event_is_out_leaves_the_run_to_the_next_one() -> None:
    h = Harness(limit=1)
    h.submit(1)
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    h.complete(1, "d1", T0 + 2)
    h.flush(T0 + 2, announce=False)  # the broker never took the event; the session ends
    assert not any(_ended(r) for r in h.ledger)
    b = h.successor(T0 + 3)
    assert b.lc.held == 1  # counted in flight until told again: never over the limit
    b.submit(1, T0 + 3, attempt=1)
    again = b.complete(1, "d1", T0 + 3)  # the result, redelivered
    b.flush(T0 + 3)
    assert b.events(1) == [S.COMPLETED]
    assert {b.submissions["x1"], again} <= b.acked()
    assert b.dispatches() == []
    assert _ended(b.ledger[-1]) == {"x1"}


def test_a_duplicate_whose_event_is_lost_is_decided_again_by_the_next_owner() -> None:
    h = Harness(limit=1)
    h.submit(1, key="k")
    h.submit(2, key="k")
    h.flush(announce=False)
    assert h.events(2) == [S.DEDUPLICATED]
    assert h.submissions["x2"] not in h.acked()
    b = h.successor(T0 + 1)
    b.submit(2, T0 + 1, key="k", attempt=1)
    b.flush(T0 + 1)
    # x1 still holds the key in the ledger: the same decision, this time settled.
    assert b.emitted(2, S.DEDUPLICATED).duplicate_of == "x1"
    assert b.submissions["x2"] in b.acked()


def test_a_retry_whose_event_died_with_its_owner_is_announced_by_the_next_one() -> None:
    h = Harness()
    h.submit(1)
    h.flush()
    h.fail(1, "d1", T0 + 1, retry_in=5)
    # The record is out; the owner dies before the event (and the report's ack, which
    # the effector sends behind it) are.
    h.flush(T0 + 1, announce=False)
    b = h.successor(T0 + 2)
    b.fail(1, "d1", T0 + 2, retry_in=5)  # its report, redelivered
    b.flush(T0 + 2)
    [retry] = b.events_of(1)
    assert (retry.status, retry.retry_count, retry.dispatch_id) == (S.RUNNING, 0, "d1")
    assert retry.retry_at == rfc3339(int((T0 + 6) * 1e9))  # when the first owner set it
    assert retry.error == ErrorInfo(type="E", message="boom")
    b.lc.tick(T0 + 6)
    b.flush(T0 + 6)
    assert [(d.count, d.retry_count) for d in b.sent(1)] == []  # its submission is not back
    b.submit(1, T0 + 7, attempt=1)
    b.flush(T0 + 7)
    assert [(d.count, d.retry_count) for d in b.sent(1)] == [(2, 1)]


def test_a_dispatch_a_dead_owner_may_not_have_sent_keeps_its_lease_through_later_takeovers() -> (
    None
):
    # The first owner dies between its record and its work. The second rebuilds it with a
    # lease, writes it into its own records and dies too, its last record naming others.
    h = Harness(limit=2)
    h.submit(1)
    h.flush()
    b = h.successor(T0 + 1)
    b.submit(1, T0 + 1, attempt=1)
    b.flush(T0 + 1)  # its checkpoint names x1, still unsent
    b.submit(2, T0 + 2)
    b.flush(T0 + 2)
    assert [e.execution_id for e in b.ledger[-1].entries] == ["x2"]
    c = b.successor(T0 + 3)
    c.submit(1, T0 + 3, attempt=2)
    c.lc.tick(T0 + 3 + LEASE - 1)
    c.flush(T0 + 3 + LEASE - 1)
    assert c.dispatches() == []
    c.lc.tick(T0 + 3 + LEASE)
    c.flush(T0 + 3 + LEASE)
    # Nobody reported it within the lease: dispatched again, with a new id.
    assert [x for x, _ in c.dispatches()] == ["x1"]
    assert [e.count for e in c.effects if isinstance(e, Dispatch)] == [2]


def test_a_reported_dispatch_is_no_longer_unsure_for_the_next_owner() -> None:
    h = Harness(limit=2)
    h.submit(1)
    h.flush()
    b = h.successor(T0 + 1)
    b.submit(1, T0 + 1, attempt=1)
    b.heartbeat(1, "d1", T0 + 2)
    b.flush(T0 + 2)
    assert not any(e.unsent for r in b.ledger for e in r.entries if e.stage == "running")
    assert b.events(1) == [S.RUNNING]


# -- ends ride the next record --------------------------------------------------------------

LINGER = 0.05


def _settles(h: Harness, n: int, now: float) -> tuple[int, int]:
    """Run x<n> to its end at ``now``; its submission and result refs."""
    h.heartbeat(n, h.dispatch_of(n), now)
    return h.submissions[f"x{n}"], h.complete(n, h.dispatch_of(n), now)


def test_an_end_rides_the_next_admissions_record_and_is_settled_behind_it() -> None:
    h = Harness(limit=2, ends_linger=LINGER)
    h.submit(1)
    h.flush()
    records = len(h.ledger)
    settled = _settles(h, 1, T0 + 0.01)
    h.flush(T0 + 0.01)
    assert len(h.ledger) == records  # no record of its own: the end waits
    assert set(settled).isdisjoint(h.acked())
    h.submit(2, T0 + 0.02)  # an admission: its record carries the end
    h.flush(T0 + 0.02)
    assert len(h.ledger) == records + 1
    stages = {e.execution_id: e.stage for e in h.ledger[-1].entries}
    assert stages == {"x2": "dispatched", "x1": "ended"}
    assert set(settled) <= h.acked()


def test_an_end_gets_a_record_of_its_own_once_the_linger_passed() -> None:
    h = Harness(limit=2, ends_linger=LINGER)
    h.submit(1)
    h.flush()
    settled = _settles(h, 1, T0 + 0.01)
    h.flush(T0 + 0.01)
    assert h.lc.busy  # deliveries wait on the record: not idle yet
    assert h.lc.next_wakeup() == pytest.approx(T0 + 0.01 + LINGER)
    h.flush(T0 + 0.01 + LINGER)
    assert _ended(h.ledger[-1]) == {"x1"}
    assert set(settled) <= h.acked()
    assert not h.lc.busy


def test_ends_do_not_wait_while_draining_or_once_enough_deliveries_wait() -> None:
    h = Harness(limit=None, ends_linger=LINGER)
    for n in range(1, 4):
        h.submit(n)
    h.flush()
    _settles(h, 1, T0 + 0.01)
    h.flush(T0 + 0.01)
    assert not _ended(h.ledger[-1])
    h.lc.drain()
    h.flush(T0 + 0.01)
    assert _ended(h.ledger[-1]) == {"x1"}
    # A batch of ends big enough is written at once, linger or not.
    b = Harness(limit=None, ends_linger=LINGER)
    b.lc.tunables = Tunables(
        lease_seconds=LEASE, hold_seconds=HOLD, ends_linger_seconds=LINGER, ends_batch=4
    )
    for n in range(1, 3):
        b.submit(n)
    b.flush()
    for n in (1, 2):
        _settles(b, n, T0 + 0.01)
    b.flush(T0 + 0.01)
    assert _ended(b.ledger[-1]) == {"x1", "x2"}  # 4 deliveries waited: no linger
