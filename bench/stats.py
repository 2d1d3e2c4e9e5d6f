"""What one measured phase produced, and how samples become figures.

Every system (a load generator against an HTTP server, or a bare publish loop)
reports ``WorkerReport``s from its processes; ``summarize`` merges them into one
``Measurement`` row. Only successes count towards throughput; latency
percentiles are over successes too (errors are counted beside them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class WorkerReport:
    """What one load process measured inside the measurement window (picklable)."""

    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    # Open loop: requests scheduled inside the window, and those never sent or
    # never answered before the grace period ran out.
    scheduled: int = 0
    unsent: int = 0
    # Open loop: how late the generator itself put each request up for sending
    # (its own stalls, e.g. when it gets no CPU); counted in the latency as well.
    lateness_ms: list[float] = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(repr(exc))


@dataclass(slots=True)
class Measurement:
    """One row of the results table."""

    key: str  # machine name of the system, e.g. "gateway-per-core"
    system: str  # what a reader sees, e.g. "gateway, 1 process"
    mode: str  # "closed loop, 64 conns" / "open loop, 3,000/s"
    duration_s: float
    ok: int
    rate: float  # successes per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: int = 0
    non_ok: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    offered_rate: float | None = None
    unsent: int = 0
    # Cores busy during the window: per role, the whole machine, and the rest
    # ("other" = processes that are not part of this benchmark).
    cpu: dict[str, float] = field(default_factory=dict)
    loadavg_before: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(
    reports: Sequence[WorkerReport],
    *,
    key: str,
    system: str,
    mode: str,
    duration_s: float,
    offered_rate: float | None = None,
) -> Measurement:
    latencies = sorted(x for r in reports for x in r.latencies_ms)
    ok = sum(r.ok for r in reports)
    statuses: dict[int, int] = {}
    for r in reports:
        for status, count in r.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    samples = [s for r in reports for s in r.error_samples][:5]
    lateness = sorted(x for r in reports for x in r.lateness_ms)
    extra: dict[str, Any] = {}
    if lateness:
        extra["generator_lateness_p50_ms"] = round(percentile(lateness, 50), 2)
        extra["generator_lateness_p99_ms"] = round(percentile(lateness, 99), 2)
    return Measurement(
        key=key,
        system=system,
        mode=mode,
        duration_s=duration_s,
        ok=ok,
        rate=ok / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        p999_ms=percentile(latencies, 99.9),
        max_ms=latencies[-1] if latencies else math.nan,
        errors=sum(r.errors for r in reports),
        non_ok={str(s): n for s, n in sorted(statuses.items()) if s != 200},
        error_samples=samples,
        offered_rate=offered_rate,
        unsent=sum(r.unsent for r in reports),
        extra=extra,
    )
