"""The benchmark harness runs end to end and every system produces figures (never a speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from bench.suite import GROUPS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_measures_every_system(tmp_path: Path, amqp_url: str) -> None:
    output = tmp_path / "result.json"
    tiny = ["--warmup", "0.3", "--duration", "1", "--connections", "4", "--client-processes", "1"]
    where = ["--output", str(output), "--amqp-url", amqp_url]
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *tiny, *where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = orjson.loads(output.read_bytes())
    measured = {m["key"] for m in result["measurements"] if m["ok"] > 0}
    assert set(GROUPS["all"]) <= measured
    assert "| system |" in completed.stdout
