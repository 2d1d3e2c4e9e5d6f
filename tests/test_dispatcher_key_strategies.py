"""Concurrency-key strategies in the lifecycle state machine: the orderings, by hand.

``partition`` (the limit per key, no head-of-line blocking, FIFO within a key),
``cancel_in_progress`` (the newest execution of a key is the one that runs) and
changes of strategy while executions are in flight; takeovers rebuild the
per-key counts from the ledger. ``deduplicate`` is the lifecycle's own tests.
"""

from __future__ import annotations

from schemas.dispatch import ErrorInfo, ExecutionStatus, Failed
from tests.test_dispatcher_lifecycle import HOLD, LEASE, T0, Harness, _cancel

S = ExecutionStatus


def dispatched(h: Harness) -> list[str]:
    return [x for x, _ in h.dispatches()]


# -- partition ---------------------------------------------------------------------------------


def test_partition_with_limit_one_runs_one_per_key_and_the_next_of_a_key_when_it_ends() -> None:
    h = Harness(limit=1, strategy="partition")
    h.submit(1, key="a")
    h.submit(2, key="a")
    h.submit(3, key="b")
    h.submit(4, key="b")
    h.flush()
    assert dispatched(h) == ["x1", "x3"]
    assert (h.lc.holding("a"), h.lc.holding("b"), h.lc.held) == (1, 1, 2)
    assert h.lc.pending == 2
    h.complete(1, h.dispatch_of(1), T0 + 1)
    h.flush(T0 + 1)
    assert dispatched(h) == ["x1", "x3", "x2"]  # b's slot is still taken: x4 waits
    h.complete(3, h.dispatch_of(3), T0 + 2)
    h.flush(T0 + 2)
    assert dispatched(h) == ["x1", "x3", "x2", "x4"]
    assert h.events(2) == [S.ADMITTED]  # never deduplicated under partition


def test_a_full_key_does_not_block_the_keys_behind_it_and_keeps_its_own_order() -> None:
    h = Harness(limit=1, strategy="partition")
    for n in range(1, 6):
        h.submit(n, key="hot")  # x1 runs, x2..x5 wait for hot's slot
    h.submit(6, key="cold")
    h.submit(7)  # no key
    h.flush()
    assert dispatched(h) == ["x1", "x6", "x7"]
    for n in range(1, 5):
        h.complete(n, h.dispatch_of(n), T0 + n)
        h.flush(T0 + n)
    assert dispatched(h) == ["x1", "x6", "x7", "x2", "x3", "x4", "x5"]


def test_executions_without_a_key_share_one_partition_of_the_limit() -> None:
    h = Harness(limit=2, strategy="partition")
    for n in (1, 2, 3):
        h.submit(n)
    h.submit(4, key="a")
    h.flush()
    assert dispatched(h) == ["x1", "x2", "x4"]
    assert h.lc.holding(None) == 2


def test_a_pending_one_ended_while_its_key_is_full_hands_its_turn_to_the_next_of_its_key() -> None:
    h = Harness(limit=1, strategy="partition")
    for n in (1, 2, 3):
        h.submit(n, key="a")
    h.flush()
    _cancel(h, 2, T0 + 1)
    h.flush(T0 + 1)
    assert h.events(2) == [S.CANCELLED]
    h.complete(1, "d1", T0 + 2)
    h.flush(T0 + 2)
    assert dispatched(h) == ["x1", "x3"]


def test_partition_limit_changes_apply_per_key_at_once() -> None:
    h = Harness(limit=1, strategy="partition")
    for n in (1, 2, 3):
        h.submit(n, key="a")
    h.submit(4, key="b")
    h.flush()
    h.lc.set_limit(2, T0)
    h.flush()
    assert dispatched(h) == ["x1", "x4", "x2"]
    h.lc.set_limit(1, T0)
    h.complete(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    assert dispatched(h) == ["x1", "x4", "x2"]  # a still holds 1: at the new limit
    h.complete(2, "d3", T0 + 2)
    h.flush(T0 + 2)
    assert dispatched(h) == ["x1", "x4", "x2", "x3"]


def test_a_new_owner_rebuilds_the_per_key_counts_and_the_lanes_from_the_ledger() -> None:
    h = Harness(limit=1, strategy="partition")
    h.submit(1, key="a")
    h.submit(2, key="a")
    h.submit(3, key="b")
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    h.lc.tick(T0 + HOLD)  # x2 parked: the ledger is its only copy
    h.flush(T0 + HOLD)
    h.lc.tick(T0 + HOLD + 1)
    h.flush(T0 + HOLD + 1)
    b = h.successor(T0 + HOLD + 2)
    assert (b.lc.holding("a"), b.lc.holding("b"), b.lc.pending) == (1, 1, 1)
    b.submit(4, T0 + HOLD + 2, key="a")
    b.submit(5, T0 + HOLD + 2, key="c")
    b.flush(T0 + HOLD + 2)
    assert dispatched(b) == ["x5"]  # a and b are full; c is not
    b.complete(1, "d1", T0 + HOLD + 3)
    b.flush(T0 + HOLD + 3)
    assert dispatched(b) == ["x5", "x2"]  # the parked one keeps its place before x4
    assert b.lc.holding("a") == 1


def test_many_waiting_on_one_key_cost_nothing_to_the_admission_of_others() -> None:
    # The heap of keys holds one live entry per key that may admit: however long a
    # full key's lane, admitting another key never walks it.
    h = Harness(limit=1, strategy="partition", owner="o")
    h.submit(1, key="hot")
    for n in range(2, 9):
        h.submit(n, key="hot")
    for n in range(100, 400):
        h.submit(n, key=f"k{n}")
        h.flush()
        assert dispatched(h)[-1] == f"x{n}"  # at once, past the 7 waiting on hot
        h.complete(n, h.dispatch_of(n), T0)
    h.flush()
    assert h.lc.pending == 7
    assert len(h.lc._ready) <= 1


# -- cancel_in_progress -----------------------------------------------------------------------


def test_a_newer_one_cancels_the_pending_one_of_its_key_which_never_runs() -> None:
    h = Harness(limit=1, strategy="cancel_in_progress")
    h.submit(1, key="other")  # takes the only slot
    h.submit(2, key="k")
    h.submit(3, key="k")
    h.flush()
    assert h.events(2) == [S.CANCELLED]
    old = h.emitted(2, S.CANCELLED)
    assert old.cancelled_by == "x3"
    assert old.error is not None
    assert "x3" in old.error.message
    assert old.with_submission
    assert h.submissions["x2"] in h.acked()
    assert h.cancels() == []  # it never ran: no worker to tell
    h.complete(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    assert dispatched(h) == ["x1", "x3"]


def test_a_newer_one_cancels_the_dispatched_one_on_its_workers_and_runs() -> None:
    h = Harness(limit=1, strategy="cancel_in_progress")
    h.submit(1, key="k")
    h.flush()
    h.submit(2, T0 + 1, key="k")
    h.flush(T0 + 1)
    assert h.events(1) == [S.ADMITTED, S.CANCELLED]
    assert h.emitted(1, S.CANCELLED).cancelled_by == "x2"
    assert h.cancels() == [("x1", "superseded", None, None)]  # every copy; reports nothing
    assert dispatched(h) == ["x1", "x2"]  # its slot went to the newer one at once
    assert h.lc.held == 1
    late = h.complete(1, "d1", T0 + 2)  # its worker finished before the cancel came
    h.flush(T0 + 2)
    assert late in h.acked()
    assert h.events(1)[-1] is S.CANCELLED
    h.complete(2, "d2", T0 + 3)
    h.flush(T0 + 3)
    assert h.events(2) == [S.ADMITTED, S.COMPLETED]


def test_a_newer_one_cancels_the_running_one_and_a_late_heartbeat_is_told_to_stop() -> None:
    h = Harness(limit=2, strategy="cancel_in_progress")
    h.submit(1, key="k")
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    h.submit(2, T0 + 2, key="k")
    h.flush(T0 + 2)
    assert h.events(1) == [S.ADMITTED, S.RUNNING, S.CANCELLED]
    assert h.cancels() == [("x1", "superseded", None, None)]
    h.heartbeat(1, "d1", T0 + 3)
    h.flush(T0 + 3)
    assert h.cancels()[-1] == ("x1", "superseded", "d1", "w1")
    assert h.events(2) == [S.ADMITTED]
    assert h.lc.holding("k") == 1


def test_an_older_one_arriving_after_a_newer_one_ends_cancelled_naming_it() -> None:
    h = Harness(limit=1, strategy="cancel_in_progress")
    h.submit(2, key="k")
    h.flush()
    h.submit(1, T0 + 1, key="k", attempt=1)  # created first, delivered (again) later
    h.flush(T0 + 1)
    assert h.events(1) == [S.CANCELLED]
    assert h.emitted(1, S.CANCELLED).cancelled_by == "x2"
    assert h.events(2) == [S.ADMITTED]
    assert h.cancels() == []


def test_executions_without_a_key_are_never_cancelled_by_each_other() -> None:
    h = Harness(limit=2, strategy="cancel_in_progress")
    for n in (1, 2, 3):
        h.submit(n)
    h.flush()
    assert dispatched(h) == ["x1", "x2"]
    assert h.lc.pending == 1
    assert S.CANCELLED not in h.events()


def test_a_new_owner_cancels_an_in_flight_one_of_the_ledger_for_a_newer_arrival() -> None:
    h = Harness(limit=1, strategy="cancel_in_progress")
    h.submit(1, key="k")
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.flush(T0 + 1)
    b = h.successor(T0 + 5)
    assert b.lc.holding("k") == 1
    b.submit(2, T0 + 5, key="k")  # x1's own submission has not come back yet
    b.flush(T0 + 5)
    assert b.events(1) == [S.CANCELLED]
    assert b.cancels() == [("x1", "superseded", None, None)]
    assert dispatched(b) == ["x2"]
    returned = b.submit(1, T0 + 6, attempt=1)  # its held submission, returned
    b.flush(T0 + 6)
    assert returned in b.acked()
    assert dispatched(b) == ["x2"]


# -- changing strategy with executions in flight ------------------------------------------------


def test_deduplicate_to_partition_admits_the_other_keys_waiting_in_arrival_order() -> None:
    h = Harness(limit=1)
    h.submit(1, key="a")
    h.submit(2, key="b")
    h.submit(3, key="c")
    h.submit(4, key="d")
    h.flush()
    assert dispatched(h) == ["x1"]
    h.lc.set_strategy("partition", T0 + 1)
    h.flush(T0 + 1)
    assert dispatched(h) == ["x1", "x2", "x3", "x4"]
    assert h.events(1) == [S.ADMITTED]  # nothing in flight is stopped


def test_partition_to_deduplicate_keeps_both_holders_and_the_queue_limit_again() -> None:
    h = Harness(limit=2, strategy="partition")
    h.submit(1, key="a")
    h.submit(2, key="a")
    h.submit(3, key="b")
    h.flush()
    assert h.lc.held == 3
    h.lc.set_strategy("deduplicate", T0 + 1)
    h.submit(4, T0 + 1, key="a")
    h.submit(5, T0 + 1, key="c")
    h.flush(T0 + 1)
    assert h.emitted(4, S.DEDUPLICATED).duplicate_of == "x1"
    assert dispatched(h) == ["x1", "x2", "x3"]  # 3 hold slots: over the limit of 2
    h.complete(1, "d1", T0 + 2)
    h.submit(6, T0 + 2, key="a")  # behind x5, which waits: 2 hold slots, at the limit
    h.flush(T0 + 2)
    assert dispatched(h) == ["x1", "x2", "x3"]
    assert h.events(6) == []
    h.complete(3, "d3", T0 + 3)
    h.flush(T0 + 3)
    assert dispatched(h) == ["x1", "x2", "x3", "x5"]
    assert h.emitted(6, S.DEDUPLICATED).duplicate_of == "x2"  # x2 still holds a


def test_switching_to_cancel_in_progress_applies_to_the_next_arrival_of_a_key() -> None:
    h = Harness(limit=2, strategy="partition")
    h.submit(1, key="a")
    h.submit(2, key="a")
    h.flush()
    h.lc.set_strategy("cancel_in_progress", T0 + 1)
    h.flush(T0 + 1)
    assert h.events(1) == [S.ADMITTED]
    assert h.events(2) == [S.ADMITTED]
    h.submit(3, T0 + 2, key="a")
    h.flush(T0 + 2)
    assert h.events(1)[-1] is S.CANCELLED
    assert h.events(2)[-1] is S.CANCELLED
    assert sorted(h.cancels()) == [
        ("x1", "superseded", None, None),
        ("x2", "superseded", None, None),
    ]
    assert dispatched(h) == ["x1", "x2", "x3"]


def test_a_lease_expiry_and_a_timeout_free_the_key_of_a_partition() -> None:
    h = Harness(limit=1, strategy="partition")
    h.submit(1, key="a", timeout=10)
    h.submit(2, key="a")
    h.flush()
    h.heartbeat(1, "d1", T0 + 1)
    h.lc.tick(T0 + 1 + LEASE / 10)
    h.flush(T0 + 1 + LEASE / 10)
    assert dispatched(h) == ["x1"]
    h.lc.tick(T0 + 10)
    h.flush(T0 + 10)
    assert h.events(1)[-1] is S.TIMED_OUT
    assert dispatched(h) == ["x1", "x2"]


# -- with retries ---------------------------------------------------------------------------------


def _fail_with_retry(h: Harness, n: int, dispatch: str, now: float, retry_in: float) -> None:
    failed = Failed(
        execution_id=f"x{n}",
        dispatch_id=dispatch,
        worker_id="w1",
        at="t",
        error=ErrorInfo(type="E", message="flaky"),
        retry_in=retry_in,
    )
    h.lc.on_result(h.ref(), failed, now)


def test_a_waiting_retry_holds_its_keys_partition() -> None:
    h = Harness(limit=1, strategy="partition")
    h.submit(1, key="a")
    h.submit(2, key="a")
    h.submit(3, key="b")
    h.flush()
    _fail_with_retry(h, 1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    assert dispatched(h) == ["x1", "x3"]  # x2 waits: a's slot is kept for the retry
    assert h.lc.holding("a") == 1
    h.lc.tick(T0 + 6)
    h.flush(T0 + 6)
    assert dispatched(h) == ["x1", "x3", "x1"]


def test_a_newer_one_cancels_a_waiting_retry_with_nothing_to_stop() -> None:
    h = Harness(limit=1, strategy="cancel_in_progress")
    h.submit(1, key="k")
    h.flush()
    _fail_with_retry(h, 1, "d1", T0 + 1, retry_in=5)
    h.flush(T0 + 1)
    h.submit(2, T0 + 2, key="k")
    h.flush(T0 + 2)
    assert h.events(1)[-1] is S.CANCELLED
    assert h.emitted(1, S.CANCELLED).cancelled_by == "x2"
    assert h.cancels() == []  # no worker runs it: its run failed, its retry never came
    h.lc.tick(T0 + 6)
    h.flush(T0 + 6)
    assert dispatched(h) == ["x1", "x2"]


def test_deduplicate_to_cancel_in_progress_finds_the_older_pending_ones_of_a_key() -> None:
    h = Harness(limit=1)
    h.submit(1, key="busy")
    h.submit(2, key="k")
    h.submit(3, key="k")  # pending: deduplicate decides only at the head
    h.flush()
    h.lc.set_strategy("cancel_in_progress", T0 + 1)
    h.submit(4, T0 + 1, key="k")
    h.flush(T0 + 1)
    assert h.events(2) == h.events(3) == [S.CANCELLED]
    assert {h.emitted(n, S.CANCELLED).cancelled_by for n in (2, 3)} == {"x4"}
    h.complete(1, "d1", T0 + 2)
    h.flush(T0 + 2)
    assert dispatched(h) == ["x1", "x4"]
