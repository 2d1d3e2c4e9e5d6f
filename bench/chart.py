"""The PNG: throughput against p99 latency, one line per system.

Each system's points are its closed-loop run (saturation) and its open-loop
runs below it; end-to-end systems plot executions/s against the p99 from
submit to worker start. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench.stats import Measurement

_STYLE: dict[str, tuple[str, str]] = {
    # key: (label, matplotlib format)
    "bare-publish": ("limit: bare aio-pika publish loop", "k^"),
    "bare-http": ("limit: bare aiohttp handler (no broker)", "kv"),
    "bare-publish-ours": ("bare loop via broker.publisher", "c^"),
    "gateway-1": ("gateway, 1 process", "o-"),
    "gateway-per-core": ("gateway, 1 process per core", "s"),
    "peer": ("peer: FastAPI + Celery send_task", "D--"),
    "e2e": ("ours end to end (executions/s, start p99)", "o-"),
    "peer-e2e": ("peer end to end: Celery worker", "D--"),
}


def write_chart(ms: Sequence[Measurement], path: Path, *, title: str) -> Path | None:
    """Write the chart; None when there is nothing to draw or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=90)
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
        ax.plot(xs, ys, fmt, label=label, markersize=6, linewidth=1.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (confirmed submissions/s; end to end: executions/s)")
    ax.set_ylabel("p99 latency, ms (end to end: submit to worker start)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
