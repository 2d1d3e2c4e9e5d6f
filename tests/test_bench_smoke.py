"""The benchmark harness runs end to end and every system produces figures (never a speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent

# What each system of ``python -m bench`` leaves in the results: measurement keys.
EXPECTED = {
    "bare-publish",
    "gateway-1",
    "gateway-per-core",
    "bare-publish-ours",
    "bare-http",
    "peer",
    "peer-e2e",
    "e2e",
    "scaling-1",
    "scaling-2",
    "status-reads",
    "batch-submit",
    "recorder-1",
}


def test_quick_benchmark_measures_every_system(tmp_path: Path, amqp_url: str) -> None:
    output = tmp_path / "result.json"
    tiny = ["--warmup", "0.3", "--duration", "0.8", "--connections", "4", "--client-processes", "1"]
    tiny += ["--queued", "300", "--scaling-queues", "4", "--open-loop", "", "--e2e-open-loop", ""]
    where = ["--output", str(output), "--amqp-url", amqp_url]
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *tiny, *where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = orjson.loads(output.read_bytes())
    measured = {m["key"] for m in result["measurements"] if m["ok"] > 0}
    assert measured >= EXPECTED, completed.stderr
    assert any("queued" in entry["state"] for entry in result["memory"])
    assert "### End to end" in completed.stdout
    assert "### Status reads, batch submits, recorder" in completed.stdout
    assert output.with_suffix(".png").stat().st_size > 0
    assert output.with_suffix(".md").read_text().startswith("### Submissions")
