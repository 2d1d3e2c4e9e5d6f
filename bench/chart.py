"""The PNG: throughput against p99 latency, one line per system.

Each system's points are its closed-loop run (saturation) and its open-loop
runs below it. Left, submissions (confirmed/s against the p99 of the answer);
right, end to end (executions/s against the p99 from submit to worker start).
Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench.stats import Measurement

_END_TO_END = ("e2e", "peer-e2e")
_STYLE: dict[str, tuple[str, str]] = {
    # key: (label, matplotlib format)
    "bare-publish": ("limit: bare aio-pika publish loop", "k^"),
    "bare-http": ("limit: bare aiohttp handler (no broker)", "kv"),
    "bare-publish-ours": ("bare loop via broker.publisher", "c^"),
    "gateway-1": ("gateway, 1 process", "o-"),
    "gateway-per-core": ("gateway, 1 process per core", "s"),
    "peer": ("peer: FastAPI + Celery send_task", "D--"),
    "e2e": ("ours: gateway -> dispatcher -> worker", "o-"),
    "peer-e2e": ("peer: FastAPI + Celery worker", "D--"),
}


def write_chart(ms: Sequence[Measurement], path: Path, *, title: str) -> Path | None:
    """Write the chart; None when there is nothing to draw or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=80)
    panels = {
        left: ("submissions: confirmed/s", "p99 latency, ms (request to 200)"),
        right: ("end to end: executions/s", "p99 submit to worker start, ms"),
    }
    drawn = False
    for key, (label, fmt) in _STYLE.items():
        points = sorted(
            (m.rate, m.p99_ms)
            for m in ms
            if m.key == key and m.rate > 0 and not math.isnan(m.p99_ms)
        )
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax = right if key in _END_TO_END else left
        ax.plot(xs, ys, fmt, label=label, markersize=6, linewidth=1.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, (xlabel, ylabel) in panels.items():
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
