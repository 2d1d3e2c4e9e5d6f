"""Running load processes in lockstep and measuring one shared window.

Each load process (forked from a ``forkserver`` that imported the load
modules once, so a phase starts in milliseconds and no state of the
orchestrator is inherited) does its set-up (connections), says ``ready``, and
waits for a ``Window``: a start time on the wall clock, a warm-up, and a
measured duration. All processes use the same window, so their counts add up,
and the orchestrator samples CPU use at the window's edges meanwhile. While
the load runs, each process sends its count of successes twice a second
(``Tick``), which the progress display turns into live figures. A process
answers with its ``WorkerReport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from bench.cpu import cores_used, snapshot
from bench.stats import WorkerReport

C = TypeVar("C")

READY = "ready"
_START_DELAY_S = 0.2
TICK_S = 0.5
_PRELOAD = ["bench.loadgen", "bench.bare_publish"]


@dataclass(frozen=True, slots=True)
class Tick:
    """A load process's running count of successes."""

    ok: int


@dataclass(frozen=True, slots=True)
class Live:
    """What the orchestrator sees once a second while load runs."""

    elapsed_s: float  # since the measured window started (negative in the warm-up)
    ok: int  # successes so far, all load processes together
    window: Window


Watcher = Callable[[Live], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    reports: list[WorkerReport]
    cores: dict[str, float]  # per role during the measured window (``cpu.cores_used``)
    window: Window


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
    wall_offset: float  # add to a perf_counter time to get the wall clock

    @classmethod
    def of(cls, window: Window) -> PerfWindow:
        offset = time.perf_counter() - time.time()
        return cls(window.t0 + offset, window.start + offset, window.end + offset, -offset)


class LoadProcessError(RuntimeError):
    pass


async def wait_for_window(conn: Connection) -> PerfWindow:
    """Child side: announce readiness and wait for the window."""
    conn.send(READY)
    window = await asyncio.to_thread(conn.recv)
    assert isinstance(window, Window)
    return PerfWindow.of(window)


@contextlib.asynccontextmanager
async def ticking(conn: Connection, report: WorkerReport) -> AsyncIterator[None]:
    """Child side: send the running count of successes every ``TICK_S`` meanwhile."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            conn.send(Tick(report.ok))

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
    watcher: Watcher | None = None,
) -> Outcome:
    """Run ``target(config, conn)`` once per config in its own process.

    Returns the reports, the window, and the cores each role used during the measured
    window (``role`` is the load processes' own, ``watch`` names the others).
    ``watcher`` is called about once a second from the start of the load.
    """
    ctx = _context()
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
        counts = [0] * len(parents)
        early: dict[int, object] = {}
        live = _watching(parents, counts, early, window, watcher)
        try:
            await sleep_until_wall(window.start)
            before = snapshot(time.time(), roles)
            await sleep_until_wall(window.end)
            after = snapshot(time.time(), roles)
        finally:
            live.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live
        reports: list[WorkerReport] = []
        for i, (parent, started) in enumerate(zip(parents, processes, strict=True)):
            if i in early:
                message = early[i]
            else:
                message = await asyncio.to_thread(_receive, parent, started, timeout_s)
            if not isinstance(message, WorkerReport):
                raise LoadProcessError(f"load process failed: {message}")
            reports.append(message)
        return Outcome(reports, cores_used(before, after), window)
    finally:
        for parent in parents:
            parent.close()
        for started in processes:
            started.join(timeout=5)
            if started.is_alive():
                started.kill()
                started.join(timeout=5)


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _watching(
    parents: Sequence[Connection],
    counts: list[int],
    early: dict[int, object],
    window: Window,
    watcher: Watcher | None,
) -> asyncio.Task[None]:
    """Read the processes' ticks (and tell ``watcher``) until cancelled; a report or a
    failure that comes meanwhile is kept in ``early``."""

    async def watch() -> None:
        next_call = time.monotonic() + 1.0
        while True:
            await asyncio.sleep(0.1)
            for i, parent in enumerate(parents):
                while i not in early and parent.poll(0):
                    message = parent.recv()
                    if isinstance(message, Tick):
                        counts[i] = message.ok
                    else:
                        early[i] = message
            if watcher is not None and time.monotonic() >= next_call:
                next_call += 1.0
                watcher(Live(time.time() - window.start, sum(counts), window))

    return asyncio.create_task(watch())


def _receive(
    conn: Connection, process: multiprocessing.process.BaseProcess, timeout_s: float
) -> object:
    """The next message from a load process other than a tick; fails if it dies or stays
    silent too long.

    Polls rather than blocking in ``recv``, so the thread always ends.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        while not conn.poll(0.2):
            if not process.is_alive() and not conn.poll(0):
                raise LoadProcessError(f"load process {process.pid} exited ({process.exitcode})")
            if time.monotonic() > deadline:
                raise LoadProcessError(f"load process {process.pid} silent for {timeout_s:.0f} s")
        message = conn.recv()
        if not isinstance(message, Tick):
            return message


def child_failed(conn: Connection, exc: BaseException) -> None:
    """Child side: report a failure instead of a ``WorkerReport``."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(f"{type(exc).__name__}: {exc}")


def run_child(conn: Connection, main: Coroutine[Any, Any, WorkerReport]) -> None:
    """Child side: run ``main`` and send its report, or its failure."""
    try:
        report = asyncio.run(main)
    except BaseException as exc:
        child_failed(conn, exc)
        raise
    conn.send(report)
