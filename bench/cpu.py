"""Who used the CPU during a window, from /proc (Linux only).

On a 2-core machine the broker, the system under test and the load generator
share the cores, and so do other people's test runs. Sampling each process's
CPU time and the machine's total busy time around the measurement window says
where the cores went, and how much went to processes that are not ours
("other"): a window with much "other" is a noisy one.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; fields after it are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent not idle since boot, and of those in interrupts.

    Interrupt time (mostly softirq: the loopback network stack) belongs to no
    process, so it is reported on its own rather than as "other".
    """
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except OSError:
        return 0.0, 0.0
    values = [int(v) for v in line.split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    # guest time is already counted in user/nice.
    busy = sum(values[:8]) - idle
    return busy / _TICKS, (values[5] + values[6]) / _TICKS


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (``VmRSS``); 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Celery's prefork pool runs tasks in children,
    whose CPU time a parent's ``/proc`` entry does not include until they exit)."""
    found = [pid]
    i = 0
    while i < len(found):
        try:
            tasks = list(Path(f"/proc/{found[i]}/task").iterdir())
        except OSError:
            tasks = []
        for task in tasks:
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
        i += 1
    return found


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return 0.0


@functools.cache
def _broker_os_pid() -> int | None:
    """The OS pid of the node ``rabbitmqctl`` talks to (the local broker), if it answers."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", "eval", "os:getpid()."],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    digits = out.strip().strip('"')
    return int(digits) if digits.isdigit() else None


def find_broker_pids() -> list[int]:
    """RabbitMQ's Erlang VM: the node ``rabbitmqctl`` reaches, else every ``beam.smp`` on
    this machine (read-only look at /proc). Other RabbitMQ nodes on a shared machine (tests
    start their own) must not count as our broker's CPU."""
    pid = _broker_os_pid()
    if pid is not None and Path(f"/proc/{pid}").exists():
        return [pid]
    return _pids_named("beam.smp")


def find_redis_pids() -> list[int]:
    """Every ``redis-server`` on this machine (read-only look at /proc): the execution
    store's CPU, which the recorder's writes cost (shared: other users count too)."""
    return _pids_named("redis-server")


def _pids_named(comm: str) -> list[int]:
    """Every process on this machine whose command name is ``comm`` (a read-only look
    at /proc)."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if name == comm:
            pids.append(int(entry.name))
    return pids


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float
    machine: float
    interrupts: float
    roles: Mapping[str, float]


def snapshot(now: float, roles: Mapping[str, Iterable[int]]) -> CpuSnapshot:
    machine, interrupts = machine_busy_seconds()
    return CpuSnapshot(
        at=now,
        machine=machine,
        interrupts=interrupts,
        roles={role: sum(process_cpu_seconds(p) for p in pids) for role, pids in roles.items()},
    )


def cores_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Cores busy on average between two snapshots: per role, in interrupts ("irq"), on the
    whole machine, and by processes that are not ours ("other")."""
    wall = after.at - before.at
    if wall <= 0:
        return {}
    used = {
        # A process that exited meanwhile reads 0 afterwards: never below zero.
        role: round(max(0.0, after.roles[role] - before.roles.get(role, 0.0)) / wall, 3)
        for role in after.roles
    }
    machine = (after.machine - before.machine) / wall
    ours = sum(used.values())
    irq = (after.interrupts - before.interrupts) / wall
    used["irq"] = round(irq, 2)
    used["machine"] = round(machine, 2)
    used["other"] = round(max(0.0, machine - ours - irq), 2)
    return used


async def wait_until_quiet(max_wait_s: float, *, below_cores: float = 0.3) -> float:
    """Wait (at most ``max_wait_s``) until the machine is nearly idle for a second.

    Between phases nothing of ours runs (the broker may still be deleting the
    last phase's queue, which is worth waiting for too), so what is busy then
    is someone else. Returns the busy cores seen last.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before, _ = machine_busy_seconds()
        started = time.monotonic()
        await asyncio.sleep(1.0)
        after, _ = machine_busy_seconds()
        busy = (after - before) / (time.monotonic() - started)
        if busy < below_cores or time.monotonic() >= deadline:
            return round(busy, 2)
