"""Results: the Markdown table, DESIGN §7's targets, and the JSON file."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from bench.stats import Measurement

_SUT_ROLES = ("gateway", "server", "publisher")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _closed(ms: Sequence[Measurement], key: str) -> list[Measurement]:
    return [m for m in ms if m.key == key and m.offered_rate is None]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def pair_ratios(ms: Sequence[Measurement]) -> list[float]:
    """gateway-1 / bare-publish for each back-to-back pair (a bare run right before)."""
    ratios: list[float] = []
    last_bare: Measurement | None = None
    for m in ms:
        if m.key == "bare-publish":
            last_bare = m
        elif m.key == "gateway-1" and m.offered_rate is None and last_bare is not None:
            if last_bare.rate > 0:
                ratios.append(m.rate / last_bare.rate)
            last_bare = None
    return ratios


def _sut_cores(m: Measurement) -> float:
    return sum(v for k, v in m.cpu.items() if k in _SUT_ROLES)


def cpu_us_per_ok(m: Measurement) -> tuple[float, float]:
    """CPU microseconds per success of the system under test and of the broker.

    Unlike the rate, this hardly depends on what else the machine runs, so it
    is the figure to compare runs by when the machine is shared.
    """
    if m.rate <= 0:
        return math.nan, math.nan
    return _sut_cores(m) / m.rate * 1e6, m.cpu.get("broker", 0.0) / m.rate * 1e6


def _cores(m: Measurement) -> str:
    sut = _sut_cores(m)
    return (
        f"{sut:.2f} / {m.cpu.get('broker', 0):.2f} / "
        f"{m.cpu.get('loadgen', 0):.2f} / {m.cpu.get('other', 0):.2f}"
    )


def markdown_table(ms: Sequence[Measurement]) -> str:
    bare = _median([m.rate for m in _closed(ms, "bare-publish")])
    lines = [
        "| system | load | confirmed/s | p50 ms | p99 ms | p99.9 ms | non-200 / errors "
        "| cores: SUT / broker / loadgen / other | CPU us/req: SUT / broker | x bare publish |",
        "|---|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for m in ms:
        bad = ", ".join(f"{s}: {n}" for s, n in m.non_ok.items())
        if m.errors:
            bad = f"{bad}; {m.errors} errors" if bad else f"{m.errors} errors"
        if m.unsent:
            bad = f"{bad}; {m.unsent} unsent" if bad else f"{m.unsent} unsent"
        ratio = f"{m.rate / bare:.2f}" if bare and not math.isnan(bare) else "-"
        if m.key == "bare-http":
            ratio = "-"  # no broker: not comparable
        sut_us, broker_us = cpu_us_per_ok(m)
        mode = m.mode
        late = m.extra.get("generator_lateness_p99_ms")
        if late is not None:
            mode = f"{mode} (generator late p99 {late:.1f} ms)"
        lines.append(
            f"| {m.system} | {mode} | {m.rate:,.0f} | {_ms(m.p50_ms)} | {_ms(m.p99_ms)} "
            f"| {_ms(m.p999_ms)} | {bad or '0'} | {_cores(m)} | {sut_us:.0f} / {broker_us:.0f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    goal: str
    value: float
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "goal": self.goal, "value": self.value, "met": self.met}


def targets(ms: Sequence[Measurement]) -> list[Target]:
    """DESIGN §7's figures this run can check (medians over repeats)."""
    out: list[Target] = []
    gw = _closed(ms, "gateway-1")
    if gw:
        rate = _median([m.rate for m in gw])
        p99 = _median([m.p99_ms for m in gw])
        out.append(Target("gateway, 1 process: confirmed/s", ">= 6,000", rate, rate >= 6000))
        out.append(Target("gateway, 1 process: p99 at saturation (ms)", "<= 30", p99, p99 <= 30))
    half = [
        m
        for m in ms
        if m.key == "gateway-1" and m.extra.get("fraction_of_saturation") == 0.5 and m.ok
    ]
    if half:
        p99 = half[0].p99_ms
        out.append(Target("gateway, 1 process: p99 at half load (ms)", "<= 10", p99, p99 <= 10))
    ratios = pair_ratios(ms)
    if ratios:
        ratio = _median(ratios)
        out.append(Target("gateway / bare aio-pika loop", ">= 0.9", ratio, ratio >= 0.9))
    per_core = _closed(ms, "gateway-per-core")
    if per_core:
        rate = _median([m.rate for m in per_core])
        out.append(
            Target("gateway, 1 process per core: confirmed/s", ">= 8,000", rate, rate >= 8000)
        )
    return out


def targets_table(ts: Sequence[Target]) -> str:
    lines = ["| DESIGN §7 target | goal | this run | met |", "|---|---|---:|---|"]
    for t in ts:
        value = f"{t.value:,.2f}" if t.value < 10 else f"{t.value:,.0f}"
        lines.append(f"| {t.name} | {t.goal} | {value} | {'yes' if t.met else '**no**'} |")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(broker_version: str) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rabbitmq": broker_version,
        "packages": {p: _version(p) for p in ("aiohttp", "aio-pika", "aiormq", "orjson")},
    }


def write_json(
    path: Path,
    *,
    command: Sequence[str],
    label: str,
    revision: str,
    machine: dict[str, Any],
    config: dict[str, Any],
    measurements: Sequence[Measurement],
    artifacts: dict[str, str],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label": label,
        "revision": revision,
        "command": list(command),
        "machine": machine,
        "config": config,
        "measurements": [m.as_dict() for m in measurements],
        "pair_ratios": pair_ratios(measurements),
        "targets": [t.as_dict() for t in targets(measurements)],
        "artifacts": artifacts,
    }
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str))
