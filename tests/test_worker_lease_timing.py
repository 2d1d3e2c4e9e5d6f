"""When the worker sends heartbeats and when its own lease ends (pure, ``worker._lease``)."""

from __future__ import annotations

from typing import Any

import pytest

from worker._lease import Leases, lease_end, margin, renew_interval

Q, R = "polos.results.p.q", "polos.results.p.r"
DELAY = 0.05


@pytest.mark.parametrize(
    ("lease", "expected_margin", "expected_end"),
    [
        (30.0, 3.0, 27.0),  # a tenth
        (10.0, 1.0, 9.0),  # at least a second
        (3.0, 1.0, 2.0),
        (1.5, 0.5, 1.0),  # never more than the renewal interval
        (0.6, 0.2, 0.4),
    ],
)
def test_the_worker_lease_ends_a_margin_before_the_owners(
    lease: float, expected_margin: float, expected_end: float
) -> None:
    assert margin(lease) == pytest.approx(expected_margin)
    assert lease_end(0.0, lease) == pytest.approx(expected_end)
    # A renewal sent an interval later still has time to be confirmed.
    assert lease_end(0.0, lease) - renew_interval(lease) > 0


# Steps: (method, arguments, expected answer); "add" takes (key, queue, lease, started).
Step = tuple[str, tuple[Any, ...], Any]

CASES: dict[str, list[Step]] = {
    "a run that ends before the running delay is never reported": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("next_wakeup", (), DELAY),
        ("finish", ("a",), None),
        ("due", (DELAY,), []),
        ("next_wakeup", (), None),
    ],
    "a long run is reported at the running delay, then renewed every third of its lease": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("due", (0.04,), []),
        ("due", (0.05,), [Q]),
        ("begin", (Q, 0.05), ["a"]),
        ("due", (0.06,), []),  # one in flight per queue
        ("confirmed", (Q, ["a"], 0.05), ["a"]),  # reported for the first time: ack it
        ("next_wakeup", (), pytest.approx(0.55)),
        ("due", (0.54,), []),
        ("due", (0.55,), [Q]),
        ("begin", (Q, 0.55), ["a"]),
        ("confirmed", (Q, ["a"], 0.55), []),  # a renewal: nothing new to ack
        ("expired", (1.05,), []),
        ("expired", (1.55,), ["a"]),
    ],
    "runs that pass the delay during a flight go in the next flush, together": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("add", ("b", Q, 1.5, 0.005), None),
        ("add", ("c", Q, 1.5, 0.02), None),
        ("due", (0.05,), [Q]),
        ("begin", (Q, 0.05), ["a"]),
        ("due", (0.08,), []),
        ("confirmed", (Q, ["a"], 0.05), ["a"]),
        ("due", (0.08,), [Q]),
        ("begin", (Q, 0.08), ["a", "b", "c"]),
        ("confirmed", (Q, ["a", "b", "c"], 0.08), ["b", "c"]),
        ("next_wakeup", (), pytest.approx(0.58)),
    ],
    "a new run's first heartbeat renews the others of its queue": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("begin", (Q, 0.05), ["a"]),
        ("confirmed", (Q, ["a"], 0.05), ["a"]),
        ("add", ("b", Q, 1.5, 0.2), None),
        ("due", (0.25,), [Q]),
        ("begin", (Q, 0.25), ["a", "b"]),
        ("confirmed", (Q, ["a", "b"], 0.25), ["b"]),
        ("next_wakeup", (), pytest.approx(0.75)),
        ("expired", (1.1,), []),
    ],
    "results queues are flushed separately": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("add", ("b", R, 1.5, 0.0), None),
        ("due", (0.05,), [Q, R]),
        ("begin", (Q, 0.05), ["a"]),
        ("begin", (R, 0.05), ["b"]),
        ("confirmed", (Q, ["a"], 0.05), ["a"]),
        ("failed", (R, 0.06), None),
        ("reported", ("a",), True),
        ("reported", ("b",), False),
    ],
    "renewals that fail end the lease a margin before the owner's": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("begin", (Q, 0.05), ["a"]),
        ("confirmed", (Q, ["a"], 0.05), ["a"]),
        ("begin", (Q, 0.55), ["a"]),
        ("failed", (Q, 0.6), None),
        ("due", (0.84,), []),
        ("due", (0.85,), [Q]),  # retried after half an interval
        ("begin", (Q, 0.85), ["a"]),
        ("failed", (Q, 1.0), None),
        ("expired", (1.049,), []),
        ("expired", (1.05,), ["a"]),  # sent 0.05 + 1.5 - 0.5
    ],
    "never confirmed: no lease, the delivery protects it": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("begin", (Q, 0.05), ["a"]),
        ("failed", (Q, 0.1), None),
        ("expired", (100.0,), []),
        ("reported", ("a",), False),
    ],
    "a queue renews at the pace of its shortest lease": [
        ("add", ("a", Q, 30.0, 0.0), None),
        ("add", ("b", Q, 3.0, 0.0), None),
        ("begin", (Q, 0.05), ["a", "b"]),
        ("confirmed", (Q, ["a", "b"], 0.05), ["a", "b"]),
        ("next_wakeup", (), pytest.approx(1.05)),
        ("remove", ("b",), None),
        ("next_wakeup", (), pytest.approx(10.05)),
    ],
    "a run removed during a flight is not reported by it": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("begin", (Q, 0.05), ["a"]),
        ("remove", ("a",), None),
        ("confirmed", (Q, ["a"], 0.05), []),
        ("next_wakeup", (), None),
    ],
    "a reported run that ended keeps being renewed until it is removed": [
        ("add", ("a", Q, 1.5, 0.0), None),
        ("begin", (Q, 0.05), ["a"]),
        ("confirmed", (Q, ["a"], 0.05), ["a"]),
        ("finish", ("a",), None),
        ("due", (0.55,), [Q]),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_heartbeat_schedule(steps: list[Step]) -> None:
    leases: Leases[str] = Leases(DELAY)
    for number, (method, args, expected) in enumerate(steps):
        got = getattr(leases, method)(*args)
        if isinstance(got, list) and method != "due":
            got = sorted(got)
        assert got == expected, f"step {number} {method}{args}"
