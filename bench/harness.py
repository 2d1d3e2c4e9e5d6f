"""Running load processes in lockstep and measuring one shared window.

Each load process (``spawn``ed: no state inherited from the orchestrator) does
its set-up (connections), says ``ready``, and waits for a ``Window``: a start
time on the wall clock, a warm-up, and a measured duration. All processes use
the same window, so their counts add up, and the orchestrator samples CPU use
at the window's edges meanwhile. A process answers with its ``WorkerReport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from bench.cpu import cores_used, snapshot
from bench.stats import WorkerReport

C = TypeVar("C")

READY = "ready"
_START_DELAY_S = 0.2


@dataclass(frozen=True, slots=True)
class Window:
    t0: float  # wall clock: load starts (warm-up begins)
    warmup_s: float
    duration_s: float

    @property
    def start(self) -> float:
        return self.t0 + self.warmup_s

    @property
    def end(self) -> float:
        return self.start + self.duration_s


@dataclass(frozen=True, slots=True)
class PerfWindow:
    """A ``Window`` on this process's ``time.perf_counter`` clock."""

    t0: float
    start: float
    end: float

    @classmethod
    def of(cls, window: Window) -> PerfWindow:
        offset = time.perf_counter() - time.time()
        return cls(window.t0 + offset, window.start + offset, window.end + offset)


class LoadProcessError(RuntimeError):
    pass


async def wait_for_window(conn: Connection) -> PerfWindow:
    """Child side: announce readiness and wait for the window."""
    conn.send(READY)
    window = await asyncio.to_thread(conn.recv)
    assert isinstance(window, Window)
    return PerfWindow.of(window)


async def sleep_until_wall(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_processes(
    target: Callable[[Any, Connection], None],
    configs: Sequence[C],
    *,
    warmup_s: float,
    duration_s: float,
    role: str,
    watch: Mapping[str, Sequence[int]],
    timeout_s: float = 60.0,
) -> tuple[list[WorkerReport], dict[str, float]]:
    """Run ``target(config, conn)`` once per config in its own process.

    Returns the reports and the cores each role used during the measured
    window (``role`` is the load processes' own, ``watch`` names the others).
    """
    ctx = multiprocessing.get_context("spawn")
    parents: list[Connection] = []
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        for config in configs:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=target, args=(config, child), daemon=True)
            process.start()
            child.close()
            parents.append(parent)
            processes.append(process)
        for parent, started in zip(parents, processes, strict=True):
            message = await asyncio.to_thread(_receive, parent, started, timeout_s)
            if message != READY:
                raise LoadProcessError(f"load process failed to start: {message}")
        window = Window(time.time() + _START_DELAY_S, warmup_s, duration_s)
        for parent in parents:
            parent.send(window)
        roles = {**watch, role: [p.pid for p in processes if p.pid] + [os.getpid()]}
        await sleep_until_wall(window.start)
        before = snapshot(time.time(), roles)
        await sleep_until_wall(window.end)
        after = snapshot(time.time(), roles)
        reports: list[WorkerReport] = []
        for parent, started in zip(parents, processes, strict=True):
            message = await asyncio.to_thread(_receive, parent, started, timeout_s)
            if not isinstance(message, WorkerReport):
                raise LoadProcessError(f"load process failed: {message}")
            reports.append(message)
        return reports, cores_used(before, after)
    finally:
        for parent in parents:
            parent.close()
        for started in processes:
            started.join(timeout=5)
            if started.is_alive():
                started.kill()
                started.join(timeout=5)


def _receive(
    conn: Connection, process: multiprocessing.process.BaseProcess, timeout_s: float
) -> object:
    """The next message from a load process; fails if it dies or stays silent too long.

    Polls rather than blocking in ``recv``, so the thread always ends.
    """
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not process.is_alive() and not conn.poll(0):
            raise LoadProcessError(f"load process {process.pid} exited ({process.exitcode})")
        if time.monotonic() > deadline:
            raise LoadProcessError(f"load process {process.pid} silent for {timeout_s:.0f} s")
    return conn.recv()


def child_failed(conn: Connection, exc: BaseException) -> None:
    """Child side: report a failure instead of a ``WorkerReport``."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(f"{type(exc).__name__}: {exc}")
