"""End to end: from the client's request to the worker starting it, and to its result.

Ours: ``python -m gateway`` → submission queues (``e2e_queues`` of them, each
with concurrency limit ``e2e_limit`` set by the requests) → ``python -m
dispatcher`` → ``python -m worker bench.e2e_worker:create`` (a no-op
workflow), with ``python -m recorder`` writing every execution's record to
Redis beside them (the execution store is part of what a user runs). The
peer: FastAPI + Celery ``send_task`` → a ``celery worker`` running the same
no-op task with ``acks_late``.

Figures per phase: executions/s (executions started inside the measured
window, from the workers' own records), submit-to-worker-start latency (from
the time the client sent the request, stamped into it, to the workflow's
first line), and for ours submit-to-result: until the ``completed`` lifecycle
event reaches a follower of ``polos.events`` (sampled on the first queue; the
peer has no result path here: its tasks ignore results, as high-rate Celery
setups do). Closed loop through the HTTP front measures saturation (the
front accepts more than the pipeline executes, so a backlog grows and the
latency then is mostly that backlog); open loop at a fraction of the
executions/s measured there gives latency under a fixed offered load.

Every phase also counts the broker's work per execution (``bench.broker_work``):
quorum-queue enqueues, deliveries and acknowledgements in the run's vhost, from
before the first submission until the last execution has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import broker_work, cpu, disk
from bench.harness import Live
from bench.phase import HttpPhase, Run, fraction_rate, measure_http, mode, request_body
from bench.reads import recorder_process
from bench.records import (
    EventFollower,
    LatencySummary,
    count_lines,
    read_records,
    started_in,
)
from bench.servers import (
    ServerProcess,
    celery_worker_process,
    delete_queues,
    dispatcher_process,
    free_port,
    gateway_process,
    purge_queues,
    running,
    worker_process,
)
from bench.stats import Measurement
from bench.submit import PEER_SYSTEM, peer_queue
from schemas.topology import RECORDER_QUEUE, results_queue, submit_queue

OURS = "ours end to end"
PEER = "FastAPI + Celery worker end to end"


class RateMeter:
    """Executions/s between calls, from a growing count."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count
        self._last = (time.monotonic(), count())

    def __call__(self, _live: Live | None = None) -> str:
        now, n = time.monotonic(), self._count()
        rate = (n - self._last[1]) / max(1e-3, now - self._last[0])
        self._last = (now, n)
        return f"{rate:8,.0f} exec/s"


async def settle(paths: Sequence[Path], *, quiet_s: float = 0.5, limit_s: float = 15.0) -> None:
    """Until no execution started for ``quiet_s`` (what was in flight has run)."""
    deadline = time.monotonic() + limit_s
    last = count_lines(paths)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        n = count_lines(paths)
        if n != last:
            last, quiet_since = n, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return


@dataclass
class Pipeline:
    """The processes of one end-to-end system, and where its workers write."""

    key: str
    system: str
    front: Sequence[ServerProcess]
    front_role: str
    roles: dict[str, ServerProcess]  # the others under test, by role
    records: Callable[[], list[Path]]
    queue_names: Callable[[str], list[str]]  # phase tag -> queue names
    # queue names -> the broker's submission queues, and other queues to clean up
    submission_queues: Callable[[list[str]], list[str]]
    side_queues: Callable[[list[str]], list[str]] = lambda names: []
    follower_project: str | None = None
    submission_kind: str = "submit"  # of bench.broker_work.queue_kind
    notes: dict[str, object] = field(default_factory=dict)
    # The dispatcher's ledger records so far (its metrics), None where there are none.
    ledger_records: Callable[[], Awaitable[int | None]] | None = None


def _watched(pipe: Pipeline) -> dict[str, list[int]]:
    """The CPU roles beside the front: the pipeline's processes, and Redis where the
    recorder writes (the shared one: what else uses it meanwhile counts too)."""
    roles = {role: p.pids() for role, p in pipe.roles.items()}
    if "recorder" in roles:
        roles["redis"] = cpu.find_redis_pids()
    return roles


async def e2e_phase(run: Run, pipe: Pipeline, rate: float | None) -> Measurement:
    config = run.config
    tenant = await run.tenant()
    names = pipe.queue_names(run.next_queue())
    run.queues += pipe.submission_queues(names) + pipe.side_queues(names)
    bodies = tuple(request_body(name, limit=config.e2e_limit) for name in names)
    follower = None
    if pipe.follower_project is not None:
        follower = EventFollower(pipe.follower_project, names[0])
        await follower.start(run.amqp_url)
    run.progress.phase(f"{pipe.system}: {'closed loop' if rate is None else f'{rate:,.0f}/s'}")
    # Broker work: from before the first submission to after the last execution (the
    # readings take the broker a moment: outside the measured window).
    async with disk.watching() as io:
        lines_before = count_lines(pipe.records())
        counted_before = await broker_work.read_async(run.vhost)
        ledger_before = await pipe.ledger_records() if pipe.ledger_records else None
        purged = 0
        try:
            result = await measure_http(
                run,
                HttpPhase(
                    key=f"{pipe.key}-submit",
                    system=pipe.system,
                    servers=pipe.front,
                    bodies=bodies,
                    headers=tenant.headers,
                    rate=rate,
                    role=pipe.front_role,
                    others=_watched(pipe),
                    live_extra=RateMeter(lambda: count_lines(pipe.records())),
                ),
            )
            await asyncio.sleep(0.2)  # the last results of the window arrive
            window = result.window
            records = read_records(pipe.records())
            inside = started_in(records, window.start, window.end)
            start = LatencySummary.of(
                [(r.started_at - r.sent_at) * 1000.0 for r in inside if not math.isnan(r.sent_at)]
            )
            http = result.measurement
            m = Measurement(
                key=pipe.key,
                system=pipe.system,
                mode=mode(config, rate),
                duration_s=config.duration_s,
                ok=len(inside),
                rate=len(inside) / config.duration_s,
                p50_ms=start.p50_ms,
                p90_ms=math.nan,
                p99_ms=start.p99_ms,
                p999_ms=start.p999_ms,
                max_ms=start.max_ms,
                errors=http.errors,
                non_ok=http.non_ok,
                error_samples=http.error_samples,
                offered_rate=rate,
                unsent=http.unsent,
                cpu=http.cpu,
                loadavg_before=http.loadavg_before,
            )
            m.extra.update(http.extra)
            m.extra.update(pipe.notes)
            m.extra["submitted_per_s"] = round(http.rate, 1)
            m.extra["submit_p50_ms"] = http.p50_ms
            m.extra["submit_p99_ms"] = http.p99_ms
            m.extra["queues"] = len(names)
            m.extra["concurrency_limit"] = config.e2e_limit
            if follower is not None:
                got = LatencySummary.of(
                    follower.result_latencies_ms(records, window.start, window.end)
                )
                m.extra["result_samples"] = got.count
                m.extra["result_p50_ms"] = got.p50_ms
                m.extra["result_p99_ms"] = got.p99_ms
                m.extra["result_p999_ms"] = got.p999_ms
        finally:
            # A saturation phase leaves a backlog: drop it, let what is in flight finish.
            purged = await purge_queues(run.amqp_url, pipe.submission_queues(names))
            await settle(pipe.records())
            if follower is not None:
                await follower.close()
    counted_after = await broker_work.read_async(run.vhost)
    ledger_after = await pipe.ledger_records() if pipe.ledger_records else None
    executed = count_lines(pipe.records()) - lines_before
    if counted_before is not None and counted_after is not None:
        work = broker_work.work_between(counted_before, counted_after)
        per = work.per(executed, purged=purged, purged_kind=pipe.submission_kind)
        if per and ledger_before is not None and ledger_after is not None:
            per["ledger_records"] = round((ledger_after - ledger_before) / executed, 3)
        m.extra["broker_per_execution"] = per
        run.progress.note(broker_work.describe(per))
    if (on_disk := io.per_execution(executed)) is not None:
        m.extra["disk_per_execution"] = on_disk
    run.record(m)
    return m


async def e2e_runs(run: Run, pipe: Pipeline, *, open_loop: bool = True) -> None:
    saturation = await e2e_phase(run, pipe, None)
    for fraction in run.config.e2e_fractions if open_loop else ():
        m = await e2e_phase(run, pipe, fraction_rate(saturation.rate, fraction))
        m.extra["fraction_of_saturation"] = fraction
    for rate in run.config.e2e_rates if open_loop else ():
        await e2e_phase(run, pipe, rate)


@contextlib.asynccontextmanager
async def ours(run: Run) -> Any:
    """Gateway, dispatcher and worker running, with the pipeline that drives them."""
    config = run.config
    tenant = await run.tenant()
    project = tenant.project_id
    records = run.directory / "ours-records.txt"
    records.touch()
    metrics_port = free_port()
    dispatcher = dispatcher_process(
        0,
        amqp_url=run.amqp_url,
        queues=f"{project}/e*",
        directory=run.directory,
        tree=config.tree,
        metrics_port=metrics_port,
    )
    worker = worker_process(
        amqp_url=run.amqp_url,
        project_id=project,
        records=records,
        directory=run.directory,
        concurrency=config.worker_concurrency,
        tree=config.tree,
    )
    gateway = gateway_process(
        0,
        amqp_url=run.amqp_url,
        tenant=tenant,
        directory=run.directory,
        extra_env={"POLOS_REDIS_KEY_PREFIX": run.redis_prefix, **config.gateway_env},
        tree=config.gateway_tree,
    )
    # The execution store is part of the pipeline: its recorder consumes a queue of its own
    # bound to this project's events (deleted afterwards: later phases of the run publish
    # events of the same project, and nothing would drain it).
    recorder_queue = f"{RECORDER_QUEUE}.{run.run_id}.e2e"
    recorder = recorder_process(
        run, 0, queue=recorder_queue, binding_key=f"{project}.#", prefix=run.redis_prefix
    )
    try:
        async with running(recorder, gateway, dispatcher, worker):
            yield Pipeline(
                key="e2e",
                system=OURS,
                front=[gateway],
                front_role="gateway",
                roles={"dispatcher": dispatcher, "worker": worker, "recorder": recorder},
                records=lambda: [records],
                queue_names=lambda tag: [f"e{tag}q{i}" for i in range(config.e2e_queues)],
                submission_queues=lambda names: [submit_queue(project, n) for n in names],
                side_queues=lambda names: [results_queue(project, n) for n in names],
                follower_project=project,
                ledger_records=lambda: broker_work.scrape_ledger_records(metrics_port),
                notes={
                    "worker_concurrency": config.worker_concurrency,
                    "dispatchers": 1,
                    "recorder": True,
                },
            )
    finally:
        await delete_queues(run.amqp_url, [recorder_queue])


async def peer_e2e(run: Run, front: ServerProcess) -> None:
    """The Celery worker behind the running FastAPI server."""
    config = run.config
    queue = peer_queue(run)
    records_dir = run.directory / "celery-records"
    records_dir.mkdir(exist_ok=True)
    celery = celery_worker_process(
        amqp_url=run.amqp_url,
        queue=queue,
        records=records_dir,
        directory=run.directory,
        pool=config.celery_pool,
        concurrency=config.celery_concurrency,
    )
    await purge_queues(run.amqp_url, [queue])
    async with running(celery):
        pipe = Pipeline(
            key="peer-e2e",
            system=PEER,
            front=[front],
            front_role="server",
            roles={"celery": celery},
            records=lambda: sorted(records_dir.glob("celery-*.txt")),
            queue_names=lambda tag: [f"e{tag}q{i}" for i in range(config.e2e_queues)],
            # One Celery queue whatever the body says (Celery has no per-queue limits).
            submission_queues=lambda names: [queue],
            submission_kind="celery",
            notes={
                "celery_pool": config.celery_pool,
                "celery_concurrency": config.celery_concurrency,
                "front": PEER_SYSTEM,
            },
        )
        # --quick: the open-loop comparison is ours alone, to stay under a minute.
        await e2e_runs(run, pipe, open_loop=not config.quick)


async def profile_e2e(run: Run, pipe: Pipeline) -> None:
    """Where an execution's cost goes: py-spy on the gateway, the dispatcher, the worker and
    the recorder during a closed-loop phase (every phase counts the broker's work:
    ``bench.broker_work``)."""
    from bench.profile import record_profile
    from bench.submit import find_py_spy

    config = run.config
    py_spy = find_py_spy()
    seconds = config.warmup_s + config.duration_s + 1
    outs = {
        role: config.results_dir / f"{run.run_id}-{role}-profile.txt"
        for role in ("dispatcher", "worker", "gateway", "recorder")
    }
    pids = {
        "dispatcher": pipe.roles["dispatcher"].pid,
        "worker": pipe.roles["worker"].pid,
        "gateway": pipe.front[0].pid,
        "recorder": pipe.roles["recorder"].pid,
    }
    await run.quiet()
    saved, run.config = run.config, dataclasses.replace(config, wait_quiet_s=0.0)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for role, out in outs.items():
                await stack.enter_async_context(
                    record_profile(py_spy, pids[role], out, seconds=seconds)
                )
            profiled = dataclasses.replace(pipe, key="e2e-profiled", system=f"{OURS}, under py-spy")
            await e2e_phase(run, profiled, None)
    finally:
        run.config = saved
    for role, out in outs.items():
        run.artifacts[f"{role}-profile"] = str(out)
