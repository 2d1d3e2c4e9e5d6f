"""The benchmark's worker fleet: a no-op workflow that notes when it started.

    BENCH_PROJECT=... BENCH_DEPLOYMENT=... BENCH_WORKFLOW=... BENCH_RECORDS=path \\
        python -m worker bench.e2e_worker:create

A real ``python -m worker`` process with the worker SDK, as a fleet runs it;
the workflow does nothing but append a line to ``BENCH_RECORDS``
(``bench.records``), so what is measured is the system's cost per execution.
"""

from __future__ import annotations

import os
from typing import Any

from bench.records import RECORDS_ENV, RecordWriter
from worker import ExecutionContext, Worker


def create() -> Worker:
    worker = Worker(project=os.environ["BENCH_PROJECT"], deployment=os.environ["BENCH_DEPLOYMENT"])
    records = RecordWriter(os.environ[RECORDS_ENV])

    async def noop(ctx: ExecutionContext, payload: Any) -> None:
        records.started(payload, ctx.execution_id)

    worker.add_workflow(os.environ["BENCH_WORKFLOW"], noop)
    return worker
