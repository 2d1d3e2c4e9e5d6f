"""The worker's intake (pure): which deliveries start, wait, or go back, and the prefetch.

Each case is a script of events with what the intake must answer, and the
prefetch it wants after each step (``worker._intake`` explains the policy).
"""

from __future__ import annotations

from typing import Any

import pytest

from worker._intake import Admission, Intake

START, WAIT, HAND_BACK = Admission.START, Admission.WAIT, Admission.HAND_BACK

# (event, arguments, answer, prefetch after)
Step = tuple[str, tuple[Any, ...], Any, int]

CASES: dict[str, tuple[int, float, list[Step]]] = {
    "within the concurrency everything starts, the rest waits for a slot": (
        2,
        10.0,
        [
            ("arrive", ("a", 0.0), START, 2),
            ("arrive", ("b", 0.0), START, 2),
            ("arrive", ("c", 0.0), WAIT, 2),
            ("end", ("a",), ["c"], 2),
            ("end", ("b",), [], 2),
        ],
    ),
    "waiting ones start oldest first": (
        1,
        10.0,
        [
            ("arrive", ("a", 0.0), START, 1),
            ("lease", ("a",), None, 1),
            ("arrive", ("b", 1.0), WAIT, 1),
            ("arrive", ("c", 2.0), WAIT, 1),
            ("end", ("a",), ["b"], 1),
            ("end", ("b",), ["c"], 1),
        ],
    ),
    "held half the hold time, the waiting go back and the worker stops consuming": (
        2,
        10.0,
        [
            ("arrive", ("a", 0.0), START, 2),
            ("arrive", ("b", 0.0), START, 2),
            ("lease", ("a",), None, 2),
            ("lease", ("b",), None, 2),
            ("arrive", ("c", 1.0), WAIT, 2),
            ("arrive", ("d", 2.0), WAIT, 2),
            ("next_due", (), 6.0, 2),
            ("due", (5.9,), [], 2),
            ("due", (6.0,), ["c", "d"], 0),
            ("next_due", (), None, 0),
            # Delivered before the consumer was cancelled: straight back.
            ("arrive", ("e", 6.1), HAND_BACK, 0),
            # A slot frees: consume exactly that many.
            ("end", ("a",), [], 1),
            ("arrive", ("f", 7.0), START, 0),
            # The last early-acknowledged run ended: the full prefetch again.
            ("end", ("b",), [], 2),
            ("end", ("f",), [], 2),
        ],
    ),
    "restricted while any leased run remains": (
        2,
        4.0,
        [
            ("arrive", ("a", 0.0), START, 2),
            ("arrive", ("b", 0.0), START, 2),
            ("lease", ("a",), None, 2),
            ("lease", ("b",), None, 2),
            ("arrive", ("c", 0.0), WAIT, 2),
            ("due", (2.0,), ["c"], 0),
            ("end", ("a",), [], 1),
            ("arrive", ("d", 3.0), START, 0),
            ("lease", ("d",), None, 0),
            ("end", ("b",), [], 1),
            ("end", ("d",), [], 2),
        ],
    ),
    "a waiting delivery that went away is not started": (
        2,
        10.0,
        [
            ("arrive", ("a", 0.0), START, 2),
            ("arrive", ("b", 0.0), START, 2),
            ("lease", ("a",), None, 2),
            ("arrive", ("c", 0.0), WAIT, 2),
            ("withdraw", ("c",), True, 2),
            ("withdraw", ("c",), False, 2),
            ("end", ("a",), [], 2),
            ("due", (100.0,), [], 2),
        ],
    ),
    "a lease of what already ended changes nothing": (
        1,
        10.0,
        [
            ("arrive", ("a", 0.0), START, 1),
            ("end", ("a",), [], 1),
            ("lease", ("a",), None, 1),
            ("arrive", ("b", 0.0), START, 1),
            ("arrive", ("c", 0.0), WAIT, 1),
            ("due", (5.0,), ["c"], 1),
        ],
    ),
    "stopping hands back every waiting one and starts none": (
        1,
        10.0,
        [
            ("arrive", ("a", 0.0), START, 1),
            ("lease", ("a",), None, 1),
            ("arrive", ("b", 0.0), WAIT, 1),
            ("arrive", ("c", 0.0), WAIT, 1),
            ("drain", (), ["b", "c"], 1),
            ("end", ("a",), [], 1),
        ],
    ),
}


@pytest.mark.parametrize(("concurrency", "hold", "steps"), CASES.values(), ids=CASES.keys())
def test_intake(concurrency: int, hold: float, steps: list[Step]) -> None:
    intake: Intake[str] = Intake(concurrency, hold)
    for number, (event, args, answer, prefetch) in enumerate(steps):
        got = getattr(intake, event)(*args)
        where = f"step {number} {event}{args}"
        assert got == answer, where
        assert intake.prefetch == prefetch, where
        assert intake.running <= concurrency, where


def test_running_never_exceeds_the_concurrency_whatever_arrives() -> None:
    intake: Intake[int] = Intake(3, 2.0)
    now = 0.0
    running: set[int] = set()
    for n in range(200):
        now += 0.1
        if intake.arrive(n, now) is START:
            running.add(n)
        if n % 2 == 0 and running:
            intake.lease(min(running))
        if n % 3 == 0 and running:
            ended = min(running)
            running.discard(ended)
            running.update(intake.end(ended))
        intake.due(now)
        assert len(running) == intake.running <= 3
