"""The benchmark states DESIGN §7's targets as §7 states them: ratios to what ran
beside them in the same run, never absolute rates."""

from __future__ import annotations

from typing import Any

from bench.report import targets, targets_table
from bench.stats import Measurement


def run(
    key: str, rate: float, *, p99: float = 10.0, half: bool = False, **extra: Any
) -> Measurement:
    if half:
        extra["fraction_of_saturation"] = 0.5
    return Measurement(
        key=key,
        system=key,
        mode="open" if half else "closed",
        duration_s=10,
        ok=int(rate * 10),
        rate=rate,
        p50_ms=p99 / 2,
        p90_ms=p99,
        p99_ms=p99,
        p999_ms=p99,
        max_ms=p99,
        offered_rate=rate if half else None,
        extra=extra,
    )


def test_end_to_end_targets_are_ratios_to_celery_in_the_same_run() -> None:
    counted = {"enqueues": 3.1}
    ms = [
        run("peer-e2e", 1000),
        run("peer-e2e", 500, p99=5.0, half=True),
        run("e2e", 2100, broker_per_execution=counted),
        run("e2e", 1050, p99=4.0, half=True, broker_per_execution={"enqueues": 2.9}),
    ]
    got = {t.name: (t.goal, round(t.value, 2), t.met) for t in targets(ms)}
    assert got == {
        "end to end executions/s / FastAPI + Celery worker's (limits, recorder)": (
            ">= 2",
            2.1,
            True,
        ),
        "submit-to-worker-start p99 at half load / Celery's at its half": ("<= 1", 0.8, True),
        "quorum enqueues per execution, recorder running (saturation)": ("<= 3", 3.1, False),
        "quorum enqueues per execution, recorder running (half load)": ("<= 3", 2.9, True),
    }


def test_a_disk_stall_in_either_half_load_phase_is_named_beside_the_p99_ratio() -> None:
    def phases(ours_stalled: float, peer_stalled: float) -> list[Measurement]:
        return [
            run("peer-e2e", 1000),
            run(
                "peer-e2e", 500, p99=5.0, half=True, disk_per_execution={"stalled_s": peer_stalled}
            ),
            run("e2e", 2100),
            run("e2e", 1050, p99=40.0, half=True, disk_per_execution={"stalled_s": ours_stalled}),
        ]

    def p99_target(ms: list[Measurement]) -> Any:
        return next(t for t in targets(ms) if t.name.startswith("submit-to-worker-start"))

    stalled = p99_target(phases(1.25, 0.0))
    assert stalled.note == "disk stalled 1.25 s in ours, 0.00 s in Celery"
    assert "(disk stalled 1.25 s in ours, 0.00 s in Celery) | <= 1 | 8.00 | **no** |" in (
        targets_table([stalled])
    )
    assert stalled.as_dict()["note"] == stalled.note
    quiet = p99_target(phases(0.0, 0.0))
    assert quiet.note == ""
    assert "note" not in quiet.as_dict()
    assert "disk" not in targets_table([quiet])


def test_gateway_targets_are_ratios_to_the_bare_loop_and_the_peer() -> None:
    ms = [
        run("bare-publish", 10_000),
        run("gateway-1", 8_500),
        run("peer", 1_000),
        run("gateway-1", 4_000, p99=6.0, half=True),
        run("peer", 500, p99=5.0, half=True),
    ]
    got = {t.name: (t.goal, round(t.value, 2), t.met) for t in targets(ms)}
    assert got["gateway, 1 process / bare aio-pika loop"] == (">= 0.8", 0.85, True)
    assert got["gateway, 1 process / FastAPI + Celery send_task"] == (">= 7", 8.5, True)
    assert got["gateway p99 at half load / the peer's at its half"] == ("<= 1", 1.2, False)
