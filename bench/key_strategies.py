"""``python -m bench.key_strategies``: the owner's CPU per execution under each strategy.

The admission decision is the dispatcher's own work (``dispatcher/lifecycle.py``,
no I/O), so this drives the state machine in process, as its table tests do, and
measures the CPU time of its decisions per execution (``on_submission`` and
``on_result``: admission, dispatch, the end and what it frees; the ledger records
between them are written but not counted, they are the same for every strategy),
the least of five rounds:

- ``deduplicate``: keys all different, the default path;
- ``partition, 100 keys``: the same load spread over 100 keys;
- ``partition, hot key``: one key with a backlog of ``BACKLOG`` waiting in front
  of everyone else's executions (head-of-line: each admission of another key
  must not walk the hot key's lane);
- ``cancel_in_progress``: each submission supersedes the running one of its key
  (100 keys, none completes: every arrival cancels one and dispatches one).

Figures are ratios to ``deduplicate`` in the same run (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dispatcher.lifecycle import Dispatch, Emit, QueueLifecycle, Tunables
from schemas.dispatch import Completed
from schemas.envelope import SubmissionEnvelope, make_submission

EXECUTIONS = 20_000
BACKLOG = 1_000
ROUNDS = 5


def _envelope(n: int, key: str | None) -> tuple[SubmissionEnvelope, bytes]:
    raw = make_submission(
        execution_id=f"{n:012d}",
        created_at="2026-12-01T00:00:00Z",
        workflow_id="wf",
        deployment_id="d1",
        concurrency_key=key,
        run_timeout_seconds=3600,
    )
    return SubmissionEnvelope.model_validate_json(raw), raw


def _flush(lc: QueueLifecycle, now: float) -> list[Any]:
    effects: list[Any] = lc.take_effects()
    write = lc.take_ledger(now)
    if write is not None:
        effects += lc.on_ledger_written(write)
    announced = getattr(lc, "on_announced", None)  # main's flush, where it has one
    if announced is not None:
        announced(
            e.execution for e in effects if isinstance(e, Emit) and getattr(e, "terminal", False)
        )
    return effects


def _run(
    strategy: str,
    key_of: Callable[[int], str | None],
    *,
    hot: int = 0,
    limit: int | None = 4,
    complete: bool = True,
) -> float:
    """CPU us per execution: ``hot`` executions of the key "hot" wait in front; each
    dispatched one completes at once (``complete``), or runs until superseded."""
    kwargs: dict[str, Any] = {} if strategy == "deduplicate" else {"strategy": strategy}
    lc = QueueLifecycle(limit, Tunables(), owner="bench", **kwargs)
    envelopes = [_envelope(n, key_of(n)) for n in range(EXECUTIONS)]
    backlog = [_envelope(EXECUTIONS + n, "hot") for n in range(hot)]
    ref = 0
    now = 1_000_000.0
    for envelope, raw in backlog:
        ref += 1
        lc.on_submission(ref, envelope, raw, 0, now)
    _flush(lc, now)
    spent = 0.0  # in the decisions only: the ledger's records are the same for all
    clock = time.process_time
    for envelope, raw in envelopes:
        ref += 1
        began = clock()
        lc.on_submission(ref, envelope, raw, 0, now)
        spent += clock() - began
        for effect in _flush(lc, now):
            if complete and isinstance(effect, Dispatch) and effect.execution.key != "hot":
                ref += 1
                result = Completed(
                    execution_id=effect.execution.execution_id,
                    dispatch_id=effect.dispatch_id,
                    worker_id="w",
                    at="t",
                    result=None,
                )
                began = clock()
                lc.on_result(ref, result, now)
                spent += clock() - began
        _flush(lc, now)
        now += 0.0001
    return spent / EXECUTIONS * 1e6


def main() -> None:
    cases: dict[str, Callable[[], float]] = {
        "deduplicate": lambda: _run("deduplicate", lambda n: f"k{n}"),
        "partition, 100 keys": lambda: _run("partition", lambda n: f"k{n % 100}"),
        f"partition, hot key ({BACKLOG} waiting)": lambda: _run(
            "partition", lambda n: f"k{n % 100}", hot=BACKLOG
        ),
        # 100 running, unlimited: every arrival cancels the running one of its key.
        "cancel_in_progress, 100 keys": lambda: _run(
            "cancel_in_progress", lambda n: f"k{n % 100}", limit=None, complete=False
        ),
    }
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, case in cases.items():
            try:
                value = case()
            except TypeError:
                continue  # a lifecycle without strategies (main before issue 12)
            best[name] = min(best.get(name, value), value)
    base = best["deduplicate"]
    for name, value in best.items():
        print(f"{name:36s} {value:6.2f} us CPU per execution  ({value / base:.2f}x)")


if __name__ == "__main__":
    main()
