"""The dispatcher alone: memory with a deep backlog, and executions/s with 1 or 2 of them.

Both publish submissions straight into submission queues (declared as the
gateway declares them and recorded in the registry, as the gateway does), so
the gateway takes no CPU from the dispatchers here.

- Backlog: ``queued_submissions`` (100k; 5k in ``--quick``) published into one
  queue with concurrency limit 1 while a dispatcher owns it. The dispatcher
  holds only its prefetch window (32 submissions for a limit of 1), never the
  backlog: its RSS must stay flat while the broker's queue grows.
- Scaling: ``scaling_queues`` (16) queues, limit ``e2e_limit`` each, filled
  beforehand; then 1, or 2, dispatchers started together own them (single
  active consumer: one consumer of each queue gets its deliveries) and drain
  them through one worker. Executions/s from the worker's records; how many
  queues each dispatcher owns from their logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aio_pika

from bench import cpu
from bench.phase import Run, rss
from bench.records import read_records, started_in
from bench.servers import (
    ServerProcess,
    dispatcher_process,
    running,
    wait_for_consumer,
    worker_process,
)
from bench.stats import Measurement
from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryWriter, declare_registry
from broker.topology import declare_queue
from schemas.envelope import make_submission
from schemas.ids import new_execution_id, now_rfc3339
from schemas.registry import QueueDeclared
from schemas.topology import results_queue, submit_queue, submit_queue_arguments

QUEUE_MAX_LENGTH = 1_000_000  # the gateway's default POLOS_QUEUE_MAX_LENGTH
OWN_LINE = "we own it now"


class Filler:
    """Declares submission queues like the gateway and publishes submissions into them."""

    def __init__(self, run: Run, project: str) -> None:
        self._run = run
        self._project = project
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._payload = {"order_id": 184467, "customer": "cus_9f3a1c", "sent_at": "nan"}

    async def __aenter__(self) -> Filler:
        self._connection = await aio_pika.connect(
            self._run.amqp_url, client_properties={"connection_name": "bench-filler"}
        )
        self._publisher = ConfirmedPublisher(self._connection, confirm_timeout=30.0, channels=2)
        await self._publisher.start()
        await declare_registry(self._connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._publisher is not None:
            await self._publisher.close()
        if self._connection is not None:
            await self._connection.close()

    async def declare(self, queue_name: str, limit: int) -> str:
        assert self._connection is not None
        assert self._publisher is not None
        name = submit_queue(self._project, queue_name)
        args = submit_queue_arguments(max_length=QUEUE_MAX_LENGTH)
        await declare_queue(self._connection, name, args)
        self._run.queues += [name, results_queue(self._project, queue_name)]
        await RegistryWriter(self._publisher).append(
            QueueDeclared(
                at=now_rfc3339(),
                project_id=self._project,
                queue_name=queue_name,
                concurrency_limit=limit,
            )
        )
        return name

    def _envelope(self, queue_name: str) -> tuple[str, bytes]:
        execution_id, created_at = new_execution_id()
        return execution_id, make_submission(
            execution_id=execution_id,
            created_at=created_at,
            project_id=self._project,
            workflow_id="bench_submit",
            deployment_id="bench-v1",
            queue_name=queue_name,
            run_timeout_seconds=3600,
            payload=self._payload,
            session_id="sess_5d1e7b",
            user_id="user_42",
            submitted_by="key_0123456789abcdef",
        )

    async def fill(self, queue_names: Sequence[str], per_queue: int, inflight: int = 256) -> None:
        """``per_queue`` submissions into each queue, ``inflight`` confirms outstanding."""
        publisher = self._publisher
        assert publisher is not None
        work = [q for _ in range(per_queue) for q in queue_names]

        async def lane(i: int) -> None:
            for queue_name in work[i::inflight]:
                execution_id, body = self._envelope(queue_name)
                await publisher.publish(
                    submit_queue(self._project, queue_name), body, message_id=execution_id
                )

        await asyncio.gather(*(lane(i) for i in range(inflight)))


async def _depth(amqp_url: str, names: Sequence[str]) -> dict[str, int]:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    out: dict[str, int] = {}
    try:
        for name in names:
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                async with connection.channel() as channel:
                    queue = await channel.declare_queue(name, passive=True)
                    out[name] = queue.declaration_result.message_count or 0
    finally:
        await connection.close()
    return out


async def backlog_memory(run: Run, dispatcher: ServerProcess, project: str) -> None:
    """Dispatcher RSS while ``queued_submissions`` wait in the broker for one queue."""
    count = run.config.queued_submissions
    queue_name = f"e{run.next_queue()}mem"
    run.progress.phase(f"dispatcher memory: {count:,} queued submissions, limit 1")
    await run.quiet()
    samples: list[float] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(rss(dispatcher.pids()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    async with Filler(run, project) as filler:
        name = await filler.declare(queue_name, limit=1)
        await wait_for_consumer(run.amqp_url, name)  # the dispatcher found it
        before = rss(dispatcher.pids())
        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        done = 0
        step = max(1, count // 20)
        while done < count:
            batch = min(step, count - done)
            await filler.fill([queue_name], batch)
            done += batch
            now = samples[-1] if samples else before
            run.progress.live(f"{done:,} published  dispatcher RSS {now:.1f} MiB")
        published_s = time.monotonic() - started
        await asyncio.sleep(1.0 if run.config.quick else 3.0)
        stop.set()
        await sampler
    after = rss(dispatcher.pids())
    depth = (await _depth(run.amqp_url, [name])).get(name, -1)
    peak = max(samples) if samples else after
    run.remember_memory("dispatcher", "at rest, owning an empty queue", before)
    run.remember_memory(
        "dispatcher",
        f"{count:,} submissions queued (limit 1)",
        after,
        peak_mb=round(peak, 1),
        growth_mb=round(peak - before, 1),
        queue_depth=depth,
        publish_s=round(published_s, 1),
    )
    run.progress.note(
        f"dispatcher RSS {before:.1f} MiB before, peak {peak:.1f} MiB, {after:.1f} MiB after; "
        f"{depth:,} still queued"
    )


def owned(log_text: str) -> int:
    return log_text.count(OWN_LINE)


@contextlib.asynccontextmanager
async def scaling_worker(run: Run, project: str) -> AsyncIterator[tuple[ServerProcess, Path]]:
    records = run.directory / "scaling-records.txt"
    records.touch()
    worker = worker_process(
        amqp_url=run.amqp_url,
        project_id=project,
        records=records,
        directory=run.directory,
        concurrency=run.config.worker_concurrency,
        tree=run.config.tree,
    )
    async with running(worker):
        yield worker, records


# Executions/s that dispatchers on this machine are not expected to reach: the fill is
# sized so that they cannot drain it within the warm-up and the window. A fixed fill
# ran dry before the window once the pipeline got quicker (the phase measured 0/s).
DRAIN_CEILING_PER_S = 12_000


def queued_per_queue(queues: int, seconds: float, quick: bool) -> int:
    """Submissions to queue in each of ``queues`` so that none runs dry within ``seconds``."""
    needed = -(-int(DRAIN_CEILING_PER_S * seconds) // max(1, queues))
    return max(500 if quick else 2500, needed)


async def scaling_phase(
    run: Run, worker: ServerProcess, records: Path, patterns: Sequence[str], label: str
) -> Measurement:
    """Drain pre-filled queues with one dispatcher per pattern (all started together)."""
    config = run.config
    tenant = await run.tenant()
    project = tenant.project_id
    tag = run.next_queue()
    names = [f"s{tag}q{i:02d}" for i in range(config.scaling_queues)]
    per_queue = queued_per_queue(len(names), config.warmup_s + config.duration_s, config.quick)
    run.progress.phase(f"scaling: {label}, {len(names)} queues x {per_queue:,} queued")
    async with Filler(run, project) as filler:
        await asyncio.gather(*(filler.declare(n, limit=config.e2e_limit) for n in names))
        await filler.fill(names, per_queue)
    await run.quiet()
    dispatchers = [
        dispatcher_process(
            i,
            amqp_url=run.amqp_url,
            queues=pattern.format(project=project, tag=tag),
            directory=run.directory,
            name=f"dispatcher-{tag}",
            tree=config.tree,
        )
        for i, pattern in enumerate(patterns)
    ]
    async with running(*dispatchers):
        roles = {
            "dispatcher": [p for d in dispatchers for p in d.pids()],
            "worker": worker.pids(),
            "broker": cpu.find_broker_pids(),
        }
        await asyncio.sleep(config.warmup_s)
        before = cpu.snapshot(time.time(), roles)
        start = time.time()
        end = start + config.duration_s
        while time.time() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.time())))
            run.progress.live(f"{time.time() - start:4.1f}/{config.duration_s:g} s")
        after = cpu.snapshot(time.time(), roles)
        depth = await _depth(run.amqp_url, [submit_queue(project, n) for n in names])
        rss_mb = rss(roles["dispatcher"])
        ownership = [owned(d.log_text()) for d in dispatchers]
    await run.discard(
        [submit_queue(project, n) for n in names] + [results_queue(project, n) for n in names],
    )
    inside = started_in(read_records([records]), start, end)
    m = Measurement(
        key=f"scaling-{len(dispatchers)}",
        system=label,
        mode=f"drain {len(names)} queues, limit {config.e2e_limit} each",
        duration_s=config.duration_s,
        ok=len(inside),
        rate=len(inside) / config.duration_s,
        p50_ms=float("nan"),
        p90_ms=float("nan"),
        p99_ms=float("nan"),
        p999_ms=float("nan"),
        max_ms=float("nan"),
        cpu=cpu.cores_used(before, after),
    )
    m.extra["dispatchers"] = len(dispatchers)
    m.extra["patterns"] = list(patterns)
    m.extra["queues_owned"] = ownership
    m.extra["queues_left_empty"] = sum(1 for v in depth.values() if v == 0)
    m.extra["dispatcher_rss_mb"] = round(rss_mb, 1)
    run.record(m)
    run.progress.note(f"queues owned per dispatcher: {ownership}")
    if m.extra["queues_left_empty"]:
        run.progress.note(
            f"{m.extra['queues_left_empty']} queue(s) ran dry: the rate is a lower bound"
        )
    return m
