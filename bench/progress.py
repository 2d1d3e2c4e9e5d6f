"""Progress on stderr: which phase runs, live figures while it runs, a line when it ends.

On a terminal the live line is rewritten in place every second; elsewhere (CI,
a log file) only the start and the result of each phase are printed, so logs
stay short. Plain text, no dependency.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from bench.stats import Measurement


class Progress:
    def __init__(self, expected_phases: int, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._expected = max(1, expected_phases)
        self._phase = 0
        self._started = time.monotonic()
        self._live_shown = False

    def _clock(self) -> str:
        elapsed = int(time.monotonic() - self._started)
        return f"{elapsed // 60}:{elapsed % 60:02d}"

    def _print(self, text: str) -> None:
        if self._live_shown:
            self._stream.write("\r\x1b[K")
            self._live_shown = False
        self._stream.write(text + "\n")
        self._stream.flush()

    def phase(self, what: str) -> None:
        self._phase += 1
        shown = max(self._phase, self._expected)
        bar_width = 20
        filled = min(bar_width, bar_width * (self._phase - 1) // shown)
        bar = "#" * filled + "." * (bar_width - filled)
        self._print(f"[{bar}] {self._phase:2d}/{shown} {self._clock()}  {what}")

    def note(self, text: str) -> None:
        self._print(f"    {text}")

    def live(self, text: str) -> None:
        if not self._tty:
            return
        self._stream.write(f"\r\x1b[K    {self._clock()}  {text}")
        self._stream.flush()
        self._live_shown = True

    def done(self, m: Measurement) -> None:
        bad = sum(m.non_ok.values()) + m.errors + m.unsent
        p50 = "-" if math.isnan(m.p50_ms) else f"{m.p50_ms:.1f}"
        p99 = "-" if math.isnan(m.p99_ms) else f"{m.p99_ms:.1f}"
        cores = ", ".join(f"{k} {v:.2f}" for k, v in m.cpu.items() if k != "machine")
        self._print(
            f"    -> {m.rate:,.0f}/s  p50 {p50} ms  p99 {p99} ms  not ok {bad}  cores: {cores}"
        )
