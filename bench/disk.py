"""The machine's disk while a phase runs: what durability costs in I/O, and stalls.

Every quorum-queue enqueue and settlement is a command in RabbitMQ's
write-ahead log, which it writes and fsyncs in batches; on a disk with an I/O
budget (virtual disks often have one) a pipeline that makes more such writes
per execution spends the budget sooner, and when it is spent the disk stops
for a while: nothing commits, every queue waits, and the start latencies of
that moment are the phase's p99. Seen here (2026-12-02): at 440 executions/s
the disk completed ~1,500 writes and ~400 flushes a second, and every few
seconds none at all for 0.25 to 0.75 s (busy 99 %, iowait ~50 % of the machine)
while the executions started in that moment waited 300 to 800 ms.

So each end-to-end phase prints, per execution, the writes and cache flushes
the disks completed (all whole disks: the broker, Redis and the logs share
them here), the share of the machine's time spent in iowait, and the seconds
in which the disk stalled (a sample of ``SAMPLE_S`` with the disk busy for at
least ``STALL_BUSY`` of it and at most ``STALL_WRITES`` writes completed).
Linux only (``/proc/diskstats``, ``/proc/stat``); elsewhere nothing is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE_S = 0.25
STALL_BUSY = 0.9  # of the sample
STALL_WRITES = 4  # completed in the sample
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_SKIP = ("loop", "ram", "zram", "sr", "fd")


@dataclass(frozen=True, slots=True)
class Reading:
    writes: int  # write requests completed, all whole disks
    flushes: int  # cache flushes completed (fsync reaches the device as these)
    busy_ms: dict[str, int]  # by disk: milliseconds with I/O outstanding
    iowait_s: float  # the machine's CPU seconds in iowait, all cores


def _whole_disks() -> set[str]:
    try:
        return {n for n in os.listdir("/sys/block") if not n.startswith(_SKIP)}
    except OSError:
        return set()


def parse(diskstats: str, stat_line: str, disks: set[str]) -> Reading:
    """A reading from the text of ``/proc/diskstats`` and the first line of ``/proc/stat``."""
    writes = flushes = 0
    busy: dict[str, int] = {}
    for line in diskstats.splitlines():
        fields = line.split()
        if len(fields) < 14 or fields[2] not in disks:
            continue
        writes += int(fields[7])
        busy[fields[2]] = int(fields[12])
        if len(fields) >= 20:  # Linux 5.5 and newer count flushes
            flushes += int(fields[18])
    values = stat_line.split()[1:]
    iowait = int(values[4]) / _TICKS if len(values) > 4 else 0.0
    return Reading(writes, flushes, busy, iowait)


def read(disks: set[str]) -> Reading | None:
    if not disks:
        return None
    try:
        diskstats = Path("/proc/diskstats").read_text()
        stat_line = Path("/proc/stat").read_text().splitlines()[0]
        return parse(diskstats, stat_line, disks)
    except (OSError, IndexError, ValueError):
        return None  # not Linux, or a kernel whose lines read otherwise: no disk figures


def stalled(before: Reading, after: Reading, seconds: float) -> bool:
    """Whether the disk stood still between two readings ``seconds`` apart."""
    busy = max((ms - before.busy_ms.get(name, ms) for name, ms in after.busy_ms.items()), default=0)
    return busy / 1000.0 >= STALL_BUSY * seconds and after.writes - before.writes <= STALL_WRITES


@dataclass
class Watch:
    """Readings at the start and end of a phase, and the stalled samples between."""

    first: Reading | None = None
    last: Reading | None = None
    started: float = 0.0
    ended: float = 0.0
    stalled_s: float = 0.0
    longest_stall_s: float = 0.0

    def per_execution(self, executed: int) -> dict[str, Any] | None:
        if self.first is None or self.last is None or executed <= 0:
            return None
        elapsed = max(1e-6, self.ended - self.started)
        cores = os.cpu_count() or 1
        return {
            "writes": round((self.last.writes - self.first.writes) / executed, 2),
            "flushes": round((self.last.flushes - self.first.flushes) / executed, 2),
            "iowait_share": round((self.last.iowait_s - self.first.iowait_s) / elapsed / cores, 3),
            "stalled_s": round(self.stalled_s, 2),
            "longest_stall_s": round(self.longest_stall_s, 2),
            "seconds": round(elapsed, 1),
        }


@contextlib.asynccontextmanager
async def watching() -> AsyncIterator[Watch]:
    """Sample the disks every ``SAMPLE_S`` while the body runs."""
    loop = asyncio.get_running_loop()
    disks = _whole_disks()
    watch = Watch(first=read(disks), started=loop.time())
    watch.last = watch.first

    async def sample() -> None:
        run = 0.0
        while watch.last is not None:
            await asyncio.sleep(SAMPLE_S)
            before = watch.last
            watch.last = read(disks)
            if watch.last is None:
                return
            if stalled(before, watch.last, SAMPLE_S):
                watch.stalled_s += SAMPLE_S
                run += SAMPLE_S
                watch.longest_stall_s = max(watch.longest_stall_s, run)
            else:
                run = 0.0

    task = loop.create_task(sample()) if watch.first is not None else None
    try:
        yield watch
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watch.last = read(disks) if watch.first is not None else None
        watch.ended = loop.time()


def disk_table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    """Markdown: (system, load, per-execution disk figures) per phase that has them."""
    counted = [(s, m, d) for s, m, d in rows if d]
    if not counted:
        return ""
    lines = [
        "| system | load | disk writes / exec | flushes / exec | iowait (share of the "
        "machine) | disk stalled, s (longest) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for system, load, d in counted:
        lines.append(
            f"| {system} | {load} | {d['writes']:.2f} | {d['flushes']:.2f} "
            f"| {d['iowait_share']:.1%} | {d['stalled_s']:.2f} of {d['seconds']:.0f} "
            f"({d['longest_stall_s']:.2f}) |"
        )
    return "\n".join(lines)
