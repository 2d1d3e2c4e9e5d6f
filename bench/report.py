"""Results: the Markdown tables, the ratios, DESIGN §7's targets, and the JSON file.

Ratios: "x limit" divides a rate by the bare aio-pika loop's (median over
repeats), "x peer" by the peer's in the same run (FastAPI + Celery
``send_task`` for submissions, its Celery worker for end to end). For
latencies "x peer" is ours over the peer's at the same fraction of each
one's own saturation: below 1 is better.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from bench import broker_work, disk, idempotency
from bench.stats import Measurement

_SUT_ROLES = ("gateway", "server", "publisher", "dispatcher", "worker", "celery", "recorder")
_PACKAGES = ("aiohttp", "aio-pika", "aiormq", "orjson", "fastapi", "uvicorn", "celery", "kombu")


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _closed(ms: Sequence[Measurement], key: str) -> list[Measurement]:
    return [m for m in ms if m.key == key and m.offered_rate is None]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base <= 0:
        return "-"
    return f"{value / base:.2f}"


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


def _us(m: Measurement, role: str) -> str:
    if m.rate <= 0 or role not in m.cpu:
        return "-"
    return f"{m.cpu[role] / m.rate * 1e6:.0f}"


def _cores(m: Measurement) -> str:
    return (
        f"{_sut_cores(m):.2f} / {m.cpu.get('broker', 0):.2f} / "
        f"{m.cpu.get('loadgen', 0):.2f} / {m.cpu.get('other', 0):.2f}"
    )


@dataclass(frozen=True, slots=True)
class Bases:
    """What ratios divide by."""

    limit: float  # bare aio-pika loop, confirmed/s
    peer: float  # FastAPI + Celery send_task, closed loop, confirmed/s
    peer_e2e: float  # Celery worker, executions/s at saturation

    @classmethod
    def of(cls, ms: Sequence[Measurement]) -> Bases:
        return cls(
            _median([m.rate for m in _closed(ms, "bare-publish")]),
            _median([m.rate for m in _closed(ms, "peer")]),
            _median([m.rate for m in _closed(ms, "peer-e2e")]),
        )

    def peer_for(self, m: Measurement) -> float:
        return self.peer_e2e if m.key in ("e2e", "peer-e2e") else self.peer


def _not_ok(m: Measurement) -> str:
    bad = ", ".join(f"{s}: {n}" for s, n in m.non_ok.items())
    if m.errors:
        bad = f"{bad}; {m.errors} errors" if bad else f"{m.errors} errors"
    if m.unsent:
        bad = f"{bad}; {m.unsent} unsent" if bad else f"{m.unsent} unsent"
    return bad or "0"


def _submission_rows(ms: Sequence[Measurement]) -> list[Measurement]:
    keys = ("bare-publish", "gateway-1", "gateway-per-core", "bare-publish-ours", "bare-http")
    return [m for m in ms if m.key in (*keys, "peer", "gateway-1-profiled")]


def submissions_table(ms: Sequence[Measurement]) -> str:
    bases = Bases.of(ms)
    lines = [
        "| system | load | confirmed/s | p50 ms | p99 ms | p99.9 ms | not ok "
        "| cores: SUT / broker / loadgen / other | CPU us/req: SUT / broker | x limit | x peer |",
        "|---|---|---:|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for m in _submission_rows(ms):
        sut_us, broker_us = cpu_us_per_ok(m)
        load = m.mode
        late = m.extra.get("generator_lateness_p99_ms")
        if late is not None:
            load = f"{load} (generator late p99 {late:.1f} ms)"
        closed = m.offered_rate is None and m.key != "bare-http"
        x_limit = _ratio(m.rate, bases.limit) if closed else "-"
        x_peer = _ratio(m.rate, bases.peer) if closed else "-"
        lines.append(
            f"| {m.system} | {load} | {m.rate:,.0f} | {_ms(m.p50_ms)} | {_ms(m.p99_ms)} "
            f"| {_ms(m.p999_ms)} | {_not_ok(m)} | {_cores(m)} | {sut_us:.0f} / {broker_us:.0f} "
            f"| {x_limit} | {x_peer} |"
        )
    return "\n".join(lines)


def latency_table(ms: Sequence[Measurement]) -> str:
    """Open loop at fractions of each system's own saturation: ours beside the peer."""
    ours = {m.extra.get("fraction_of_saturation"): m for m in ms if m.key == "gateway-1"}
    peer = {m.extra.get("fraction_of_saturation"): m for m in ms if m.key == "peer"}
    fractions = sorted(f for f in ours if isinstance(f, float))
    if not fractions:
        return ""
    lines = [
        "| fraction of saturation | gateway rate | p50 / p99 / p99.9 ms | peer rate "
        "| p50 / p99 / p99.9 ms | x peer: p50 / p99 / p99.9 |",
        "|---:|---:|---|---:|---|---|",
    ]
    for f in fractions:
        o, p = ours[f], peer.get(f)
        ol = f"{_ms(o.p50_ms)} / {_ms(o.p99_ms)} / {_ms(o.p999_ms)}"
        if p is None:
            lines.append(f"| {f:.0%} | {o.rate:,.0f} | {ol} | - | - | - |")
            continue
        pl = f"{_ms(p.p50_ms)} / {_ms(p.p99_ms)} / {_ms(p.p999_ms)}"
        xs = " / ".join(
            _ratio(a, b)
            for a, b in ((o.p50_ms, p.p50_ms), (o.p99_ms, p.p99_ms), (o.p999_ms, p.p999_ms))
        )
        lines.append(f"| {f:.0%} | {o.rate:,.0f} | {ol} | {p.rate:,.0f} | {pl} | {xs} |")
    return "\n".join(lines)


def e2e_table(ms: Sequence[Measurement]) -> str:
    rows = [m for m in ms if m.key in ("e2e", "peer-e2e", "e2e-profiled", "e2e-counted")]
    if not rows:
        return ""
    bases = Bases.of(ms)
    peer_by_fraction = {m.extra.get("fraction_of_saturation"): m for m in ms if m.key == "peer-e2e"}
    lines = [
        "| system | load | submitted/s | executions/s | start p50 / p99 / p99.9 ms "
        "| result p50 / p99 ms | not ok | CPU us/exec: front / dispatcher / worker / recorder "
        "/ broker / redis "
        "| cores: SUT / broker / loadgen / other | x limit | x peer: exec/s, start p99 |",
        "|---|---|---:|---:|---|---|---|---|---|---:|---|",
    ]
    for m in rows:
        front = "gateway" if "gateway" in m.cpu else "server"
        worker = "worker" if "worker" in m.cpu else "celery"
        us = " / ".join(
            _us(m, r) for r in (front, "dispatcher", worker, "recorder", "broker", "redis")
        )
        start = f"{_ms(m.p50_ms)} / {_ms(m.p99_ms)} / {_ms(m.p999_ms)}"
        result = f"{_ms(m.extra.get('result_p50_ms'))} / {_ms(m.extra.get('result_p99_ms'))}"
        closed = m.offered_rate is None
        x_limit = _ratio(m.rate, bases.limit) if closed else "-"
        x_peer = "-"
        if m.key == "e2e":
            other = peer_by_fraction.get(m.extra.get("fraction_of_saturation"))
            rate_x = _ratio(m.rate, bases.peer_e2e) if closed else "-"
            p99_x = _ratio(m.p99_ms, other.p99_ms) if other is not None else "-"
            x_peer = f"{rate_x}, {p99_x}"
        lines.append(
            f"| {m.system} | {m.mode} | {m.extra.get('submitted_per_s', 0):,.0f} | {m.rate:,.0f} "
            f"| {start} | {result} | {_not_ok(m)} | {us} | {_cores(m)} | {x_limit} | {x_peer} |"
        )
    return "\n".join(lines)


def broker_table(ms: Sequence[Measurement]) -> str:
    rows = [(m.system, m.mode, m.extra.get("broker_per_execution") or {}) for m in ms]
    return broker_work.broker_table(rows)


def disk_table(ms: Sequence[Measurement]) -> str:
    rows = [(m.system, m.mode, m.extra.get("disk_per_execution") or {}) for m in ms]
    return disk.disk_table(rows)


def memory_table(ms: Sequence[Measurement], memory: Iterable[dict[str, Any]]) -> str:
    lines = ["| process | state | RSS MiB | |", "|---|---|---:|---|"]
    shown = {
        "gateway-1": "gateway, 1 process",
        "peer": "FastAPI (uvicorn)",
        "e2e": "",
        "peer-e2e": "",
    }
    for key, label in shown.items():
        closed = _closed(ms, key)
        if not closed:
            continue
        for role, figures in closed[0].extra.get("rss_mb", {}).items():
            name = label or {"celery": "Celery worker (all processes)"}.get(role, role)
            if key in ("e2e", "peer-e2e") and role in ("gateway", "server"):
                continue  # shown with the submission runs
            lines.append(f"| {name} | at rest | {figures['rest']:.1f} | |")
            lines.append(
                f"| {name} | peak under saturation ({closed[0].system}) | {figures['peak']:.1f} | |"
            )
    for entry in memory:
        note = ", ".join(
            f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) else f"{k.replace('_', ' ')} {v}"
            for k, v in entry.items()
            if k not in ("process", "state", "rss_mb")
        )
        lines.append(f"| {entry['process']} | {entry['state']} | {entry['rss_mb']:.1f} | {note} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def scaling_table(ms: Sequence[Measurement]) -> str:
    rows = [m for m in ms if m.key.startswith("scaling-")]
    if not rows:
        return ""
    base = rows[0].rate
    lines = [
        "| dispatchers | executions/s | queues owned each | CPU us/exec: dispatchers / worker "
        "/ broker | cores: dispatchers / worker / broker / other | x 1 dispatcher |",
        "|---|---:|---|---|---|---:|",
    ]
    for m in rows:
        owned = " / ".join(str(n) for n in m.extra.get("queues_owned", []))
        empty = m.extra.get("queues_left_empty", 0)
        rate = f"{m.rate:,.0f}" + (f" ({empty} queues ran dry)" if empty else "")
        us = " / ".join(_us(m, r) for r in ("dispatcher", "worker", "broker"))
        cores = " / ".join(f"{m.cpu.get(r, 0):.2f}" for r in ("dispatcher", "worker", "broker"))
        cores += f" / {m.cpu.get('other', 0):.2f}"
        lines.append(f"| {m.system} | {rate} | {owned} | {us} | {cores} | {_ratio(m.rate, base)} |")
    return "\n".join(lines)


_STORE_UNITS = {"status-reads": "reads", "batch-submit": "submissions"}


def store_table(ms: Sequence[Measurement]) -> str:
    """Issue 4: status reads/s, batch submissions/s beside single submits, recorder events/s.

    CPU per unit: per read, per submission (not per batch request), per event recorded.
    """
    rows = [m for m in ms if m.key in _STORE_UNITS or m.key.startswith("recorder-")]
    if not rows:
        return ""
    single = _median([m.rate for m in _closed(ms, "gateway-1")])
    lines = [
        "| system | load | per second | p50 ms | p99 ms | not ok "
        "| CPU us per unit: SUT / broker | cores: SUT / broker / loadgen / other "
        "| x single submits |",
        "|---|---|---|---:|---:|---|---|---|---:|",
    ]
    for m in rows:
        per = float(m.extra.get("batch_size", 1))
        units = m.rate * per
        sut_us, broker_us = cpu_us_per_ok(m)
        if m.key == "batch-submit":
            figure = f"{units:,.0f} submissions ({m.rate:,.0f} requests)"
            x_single = _ratio(units, single)
        else:
            figure = f"{units:,.0f} {_STORE_UNITS.get(m.key, 'events')}"
            x_single = "-"
        lines.append(
            f"| {m.system} | {m.mode} | {figure} | {_ms(m.p50_ms)} | {_ms(m.p99_ms)} "
            f"| {_not_ok(m)} | {sut_us / per:.0f} / {broker_us / per:.0f} | {_cores(m)} "
            f"| {x_single} |"
        )
    return "\n".join(lines)


def idempotency_table(ms: Sequence[Measurement]) -> str:
    """Issue 12: submissions without a key, with a new key each, and all retries of one."""
    rows = [m for m in ms if m.key in idempotency.SYSTEMS]
    if not rows:
        return ""
    base = _median([m.rate for m in rows if m.key == idempotency.NO_KEY])
    lines = [
        "| system | answered 200/s | p50 ms | p99 ms | not ok "
        "| CPU us/req: SUT / broker | cores: SUT / broker / loadgen / other | x no key |",
        "|---|---:|---:|---:|---|---|---|---:|",
    ]
    for m in rows:
        sut_us, broker_us = cpu_us_per_ok(m)
        lines.append(
            f"| {m.system} | {m.rate:,.0f} | {_ms(m.p50_ms)} | {_ms(m.p99_ms)} | {_not_ok(m)} "
            f"| {sut_us:.0f} / {broker_us:.0f} | {_cores(m)} | {_ratio(m.rate, base)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    goal: str
    value: float
    met: bool
    note: str = ""  # what the reader needs beside the figure (a disk stall in its phases)

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "goal": self.goal, "value": self.value, "met": self.met}
        return out | ({"note": self.note} if self.note else {})


def _stalls(**phases: Measurement) -> str:
    """The seconds the disk stood still during each phase, when it did in any."""
    stalled = {
        who: float((m.extra.get("disk_per_execution") or {}).get("stalled_s", 0.0))
        for who, m in phases.items()
    }
    if not any(stalled.values()):
        return ""
    return "disk stalled " + ", ".join(f"{s:.2f} s in {who}" for who, s in stalled.items())


def _at_half(ms: Sequence[Measurement], key: str) -> Measurement | None:
    for m in ms:
        if m.key == key and m.extra.get("fraction_of_saturation") == 0.5 and m.ok:
            return m
    return None


def targets(ms: Sequence[Measurement], memory: Sequence[dict[str, Any]] = ()) -> list[Target]:
    """DESIGN §7's figures this run can check (medians over repeats), as §7 states
    them: ratios to what ran beside them in the same run."""
    out: list[Target] = []
    bases = Bases.of(ms)
    ratios = pair_ratios(ms)
    if ratios:
        ratio = _median(ratios)
        out.append(Target("gateway, 1 process / bare aio-pika loop", ">= 0.8", ratio, ratio >= 0.8))
    gw = _closed(ms, "gateway-1")
    if gw and not math.isnan(bases.peer):
        x = _median([m.rate for m in gw]) / bases.peer
        out.append(Target("gateway, 1 process / FastAPI + Celery send_task", ">= 7", x, x >= 7))
    ours, peer = _at_half(ms, "gateway-1"), _at_half(ms, "peer")
    if ours is not None and peer is not None:
        x = ours.p99_ms / peer.p99_ms
        name = "gateway p99 at half load / the peer's at its half"
        out.append(Target(name, "<= 1", x, x <= 1))
    e2e = _closed(ms, "e2e")
    if e2e and not math.isnan(bases.peer_e2e):
        x = e2e[0].rate / bases.peer_e2e
        name = "end to end executions/s / FastAPI + Celery worker's (limits, recorder)"
        out.append(Target(name, ">= 2", x, x >= 2))
    e2e_half, peer_half = _at_half(ms, "e2e"), _at_half(ms, "peer-e2e")
    if e2e_half is not None and peer_half is not None:
        x = e2e_half.p99_ms / peer_half.p99_ms
        name = "submit-to-worker-start p99 at half load / Celery's at its half"
        note = _stalls(ours=e2e_half, Celery=peer_half)
        out.append(Target(name, "<= 1", x, x <= 1, note))
    for m in [*e2e[:1], *([e2e_half] if e2e_half is not None else [])]:
        counted = m.extra.get("broker_per_execution")
        if counted:
            enqueues = float(counted["enqueues"])
            load = "saturation" if m.offered_rate is None else "half load"
            name = f"quorum enqueues per execution, recorder running ({load})"
            out.append(Target(name, "<= 3", enqueues, enqueues <= 3))
    for entry in memory:
        if "growth_mb" in entry:
            growth = float(entry["growth_mb"])
            out.append(
                Target(
                    f"dispatcher RSS growth with {entry['state']} (MiB)",
                    "flat (< 10)",
                    growth,
                    growth < 10,
                )
            )
    return out


def targets_table(ts: Sequence[Target]) -> str:
    lines = ["| DESIGN §7 target | goal | this run | met |", "|---|---|---:|---|"]
    for t in ts:
        value = f"{t.value:,.2f}" if abs(t.value) < 10 else f"{t.value:,.0f}"
        name = f"{t.name} ({t.note})" if t.note else t.name
        lines.append(f"| {name} | {t.goal} | {value} | {'yes' if t.met else '**no**'} |")
    return "\n".join(lines)


def markdown_report(ms: Sequence[Measurement], memory: Sequence[dict[str, Any]]) -> str:
    parts = [
        ("Submissions", submissions_table(ms)),
        ("Latency below saturation, open loop", latency_table(ms)),
        ("Status reads, batch submits, recorder", store_table(ms)),
        ("Idempotency keys", idempotency_table(ms)),
        ("End to end", e2e_table(ms)),
        ("Broker work per execution", broker_table(ms)),
        ("The disk, per execution (from the first submission to the last start)", disk_table(ms)),
        ("Memory", memory_table(ms, memory)),
        ("Dispatcher scaling", scaling_table(ms)),
        ("DESIGN §7", targets_table(targets(ms, memory))),
    ]
    return "\n\n".join(f"### {title}\n\n{table}" for title, table in parts if table) + "\n"


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
        "packages": {p: _version(p) for p in _PACKAGES},
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
    memory: Sequence[dict[str, Any]],
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
        "memory": list(memory),
        "pair_ratios": pair_ratios(measurements),
        "targets": [t.as_dict() for t in targets(measurements, memory)],
        "artifacts": artifacts,
    }
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str))
