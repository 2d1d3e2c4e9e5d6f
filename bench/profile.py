"""Sampling the gateway with py-spy during a load phase, and reading the samples.

py-spy (``pip install py-spy``; not a project dependency) attaches to the
running gateway without pausing it (``--nonblocking``) and writes collapsed
stacks. ``summarize_profile`` turns them into the two lists that say where a
process's time goes: self time per function (where the CPU is spent) and
inclusive time (which call paths are expensive), plus the share of samples in
which the event loop was idle (waiting in ``select``), i.e. not CPU-bound. On
uvloop that share also holds the loop's own C work (its socket reads and
writes): there it is an upper bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

_IDLE_LEAVES = (
    "select (selectors.py)",
    "poll (selectors.py)",
    "_run_once (asyncio/base_events.py)",
    # On uvloop (every role's default) the loop is C code under the runner: a sample
    # there is the loop waiting, or doing its own work (polling, socket reads and
    # writes), which py-spy cannot tell apart without native stacks.
    "Runner.run (asyncio/runners.py)",
)


def _start(py_spy: str, pid: int, raw: Path, seconds: float) -> subprocess.Popen[bytes]:
    raw.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--idle"]
    argv += ["--nolineno", "--format", "raw", "--duration", str(int(seconds)), "--output", str(raw)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen[bytes], raw: Path, out: Path) -> None:
    if not raw.exists():
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        raise RuntimeError(f"py-spy wrote no samples: {stderr[-1000:]}")
    out.write_text(summarize_profile(raw.read_text()))


@contextlib.asynccontextmanager
async def record_profile(
    py_spy: str, pid: int, out: Path, *, seconds: float
) -> AsyncIterator[None]:
    """Sample ``pid`` for about ``seconds`` while the body runs; summary to ``out``."""
    raw = out.with_suffix(".collapsed")
    process = _start(py_spy, pid, raw, seconds)
    try:
        yield
    finally:
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=seconds + 30)
        except TimeoutError:
            process.kill()
    _finish(process, raw, out)


def summarize_profile(collapsed: str, *, top: int = 30) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # py-spy starts each stack with the process/thread name; skip non-frames.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if any(i in leaf for i in _IDLE_LEAVES):
            idle += count
            continue
        own[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
    busy = max(1, total - idle)
    lines = [
        f"samples: {total}; event loop idle (in select, or in uvloop's own code): "
        f"{idle / max(1, total):.1%}",
        "",
        f"self time, share of busy samples ({busy}):",
    ]
    lines += [f"  {n / busy:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive time, share of busy samples:"]
    lines += [f"  {n / busy:6.1%}  {frame}" for frame, n in inclusive.most_common(top + 20)]
    return "\n".join(lines) + "\n"
