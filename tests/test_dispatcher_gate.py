"""The gate's decisions in the cases a broker test cannot stage on demand: what a
takeover hands a new owner in an unlucky order. Pure bookkeeping, no broker."""

from __future__ import annotations

from typing import Any, cast

import aiormq

from dispatcher.admission import Execution, Gate, Phase, Verdict
from dispatcher.consumers import Delivery
from schemas.envelope import SubmissionEnvelope


def _execution(n: int, *, key: str | None = None, recover_until: float | None = None) -> Execution:
    envelope = SubmissionEnvelope(
        execution_id=f"e{n}",
        created_at="2026-01-01T00:00:00.000000Z",
        project_id="p",
        workflow_id="w",
        deployment_id="d",
        queue_name="q",
        concurrency_key=key,
        run_timeout_seconds=60,
        session_id="s",
        submitted_by="key_test",
    )
    channel = cast(aiormq.abc.AbstractChannel, cast(Any, None))
    delivery = Delivery(channel, n, b"", recover_until is not None)
    return Execution(envelope, b"", delivery, recover_until=recover_until)


def _drain(gate: Gate, now: float) -> list[tuple[Verdict, str]]:
    decisions = []
    while (decision := gate.next(now)) is not None:
        decisions.append((decision.verdict, decision.execution.execution_id))
    return decisions


def test_a_redelivery_nobody_runs_waits_for_a_slot_its_marked_neighbours_hold() -> None:
    # Limit 2. The dead owner ran e2 and e3; e1 it had received but not admitted.
    # The new owner gets e1 first: it recovers (holds a slot while it waits).
    gate = Gate(limit=2)
    e1, e2, e3 = (_execution(n, recover_until=10.0) for n in (1, 2, 3))
    for execution in (e1, e2, e3):
        gate.enqueue(execution)
    assert _drain(gate, now=0.0) == [(Verdict.RECOVER, "e1"), (Verdict.RECOVER, "e2")]
    # Markers of e2 and e3 arrive: both run, e3 counted over the limit.
    gate.mark_in_flight(e2)
    gate.mark_in_flight(e3)
    assert gate.used == 3
    # e1's grace passes without a marker: no slot is left for it, back it goes.
    assert gate.resolve_recovering(e1) is None
    assert e1.phase is Phase.PENDING
    assert _drain(gate, now=11.0) == []
    gate.finish(e2)
    assert _drain(gate, now=11.0) == [(Verdict.ADMIT, "e1")]  # beside e3: two


def test_a_late_marker_still_finds_a_redelivery_sent_back_to_the_queue() -> None:
    gate = Gate(limit=1)
    e1, e2 = _execution(1, recover_until=10.0), _execution(2, recover_until=10.0)
    gate.enqueue(e1)
    gate.enqueue(e2)
    assert _drain(gate, now=0.0) == [(Verdict.RECOVER, "e1")]
    gate.mark_in_flight(e2)  # e2's marker: it runs, over the limit
    assert gate.resolve_recovering(e1) is None
    assert gate.find("e1") is e1
    gate.mark_in_flight(e1)  # and e1's marker after all: it runs too, not dispatched again
    assert not gate.pending
    assert set(gate.held) == {"e1", "e2"}


def test_a_duplicate_is_settled_at_the_head_without_a_slot() -> None:
    gate = Gate(limit=1)
    holder, duplicate, other = _execution(1, key="k"), _execution(2, key="k"), _execution(3)
    for execution in (holder, duplicate, other):
        gate.enqueue(execution)
    assert _drain(gate, now=0.0) == [(Verdict.ADMIT, "e1"), (Verdict.DEDUPLICATE, "e2")]
    gate.finish(holder)
    assert _drain(gate, now=0.0) == [(Verdict.ADMIT, "e3")]
    again = _execution(4, key="k")
    gate.enqueue(again)
    gate.finish(other)
    assert _drain(gate, now=0.0) == [(Verdict.ADMIT, "e4")]  # the key is free again


def test_a_lowered_limit_admits_nothing_until_below_it() -> None:
    gate = Gate(limit=3)
    executions = [_execution(n) for n in range(6)]
    for execution in executions:
        gate.enqueue(execution)
    assert len(_drain(gate, now=0.0)) == 3
    gate.limit = 1
    gate.finish(executions[0])
    assert _drain(gate, now=0.0) == []
    gate.finish(executions[1])
    assert _drain(gate, now=0.0) == []
    gate.finish(executions[2])
    assert _drain(gate, now=0.0) == [(Verdict.ADMIT, "e3")]
