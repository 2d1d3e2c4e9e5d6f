"""Issue 4's figures, measured in the same run as the submit figures.

- ``status-reads``: ``GET /api/v1/executions/{id}`` from the gateway for ids that
  exist. The records are written beforehand through ``store.ExecutionStore.record``
  (the ``queued`` event the gateway announces for each submission) under the
  run's own Redis key prefix, which the run's gateways read
  (``POLOS_REDIS_KEY_PREFIX``); each connection cycles through its share of
  the ids. Closed loop: reads/s, latency, gateway CPU per read.
- ``batch-submit``: ``POST /api/v1/workflows/batch_run`` with ``batch_size``
  items each, closed loop: submissions/s beside the single submits.
- ``recorder``: ``N`` queued events published (confirmed) to ``polos.events``,
  ``EVENTS_PER_MESSAGE`` to a batch, for a project of the phase's own, waiting
  in a recorder queue of its own (bound to that project only); then
  ``python -m recorder`` (1, then 2 processes) starts on it with a key prefix
  of its own. Events/s runs from the first record in Redis to the last (the
  recorder's start-up is not counted).

Every key written under the run's prefix is deleted at the end of the run.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import orjson

from bench import cpu
from bench.phase import HttpPhase, Run, measure_http, request_body, submission
from bench.servers import DEPLOYMENT, WORKFLOW, ServerProcess, delete_queues, running
from bench.stats import Measurement
from broker.topology import declare_recorder_queue
from schemas.dispatch import LifecycleEvent, encode_event_batch, encode_queued_event
from schemas.topology import EVENTS_EXCHANGE, event_batch_routing_key, submit_queue
from store import ExecutionStore
from store.execution_store import open_redis
from store.layout import index_key

BATCH_PATH = "/api/v1/workflows/batch_run"
_EVENTS_QUEUE_NAME = "rec"
# Records written per ``ExecutionStore.record`` call when prefilling.
_PREFILL_BATCH = 500
# Events per message in the recorder phase: about what a round of the gateway or a
# dispatcher flush carries at a few hundred executions/s.
EVENTS_PER_MESSAGE = 20


def redis_url() -> str:
    return os.environ.get("POLOS_REDIS_URL", "redis://127.0.0.1:6379/0")


def queued_event(project_id: str, queue_name: str) -> tuple[str, bytes]:
    """A ``queued`` event as the gateway announces it (the envelope embedded): id, body."""
    envelope = submission(project_id, queue_name)
    head = orjson.loads(envelope)
    body = encode_queued_event(
        execution_id=head["execution_id"],
        created_at=head["created_at"],
        project_id=project_id,
        workflow_id=WORKFLOW,
        deployment_id=DEPLOYMENT,
        queue_name=queue_name,
        concurrency_key=None,
        submission_raw=envelope,
    )
    return str(head["execution_id"]), body


async def prefill(run: Run, count: int) -> list[str]:
    """``count`` records of the run's project in the run's key prefix; their ids."""
    project_id = (await run.tenant()).project_id
    redis = open_redis(redis_url())
    store = ExecutionStore(redis, retention_seconds=3600, key_prefix=run.redis_prefix)
    ids: list[str] = []
    try:
        for start in range(0, count, _PREFILL_BATCH):
            events = []
            for _ in range(min(_PREFILL_BATCH, count - start)):
                execution_id, body = queued_event(project_id, "reads")
                events.append(LifecycleEvent.model_validate_json(body))
                ids.append(execution_id)
            await store.record(events)
    finally:
        await redis.aclose()
    return ids


async def delete_keys(prefix: str) -> int:
    """Delete every Redis key under ``prefix`` (the run's own); how many."""
    redis = open_redis(redis_url())
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await redis.unlink(*batch)
                batch = []
        if batch:
            deleted += await redis.unlink(*batch)
    finally:
        await redis.aclose()
    return deleted


async def status_reads(run: Run, servers: Sequence[ServerProcess]) -> Measurement:
    config = run.config
    tenant = await run.tenant()
    run.progress.phase(f"gateway, status reads: prefill {config.status_records:,} records")
    ids = await prefill(run, config.status_records)
    run.progress.phase(f"gateway, status reads: closed loop over {len(ids):,} records")
    result = await measure_http(
        run,
        HttpPhase(
            key="status-reads",
            system="gateway, status reads",
            servers=servers,
            bodies=(b"",),
            headers=tenant.headers,
            method="GET",
            paths=tuple(f"/api/v1/executions/{i}" for i in ids),
        ),
    )
    m = result.measurement
    m.extra["records"] = len(ids)
    m.extra["processes"] = len(servers)
    run.record(m)
    return m


def batch_body(queue_name: str, size: int) -> bytes:
    item = orjson.loads(request_body(queue_name))
    item["workflow_id"] = WORKFLOW
    item["payload"]["sent_at"] = "0"
    return orjson.dumps({"workflows": [item] * size})


async def batch_submit(run: Run, servers: Sequence[ServerProcess]) -> Measurement:
    config = run.config
    tenant = await run.tenant()
    queue_name = run.next_queue()
    queue = submit_queue(tenant.project_id, queue_name)
    run.queues.append(queue)
    run.progress.phase(f"gateway, batch_run of {config.batch_size}: closed loop")
    result = await measure_http(
        run,
        HttpPhase(
            key="batch-submit",
            system=f"gateway, batch_run of {config.batch_size}",
            servers=servers,
            bodies=(batch_body(queue_name, config.batch_size),),
            headers=tenant.headers,
            path=BATCH_PATH,
            # 64 connections would hold 6,400 submissions in flight: confirms then pass
            # the gateway's 5 s deadline and batches fail (503).
            connections=config.batch_connections,
        ),
    )
    m = result.measurement
    m.extra["batch_size"] = config.batch_size
    m.extra["submissions_per_s"] = m.rate * config.batch_size
    m.extra["processes"] = len(servers)
    run.record(m)
    await run.discard([queue])
    return m


async def gateway_extras(run: Run, servers: Sequence[ServerProcess], chosen: Sequence[str]) -> None:
    """The status reads and batch submits, on gateways already running."""
    if "status-reads" in chosen:
        await status_reads(run, servers)
    if "batch-submit" in chosen:
        await batch_submit(run, servers)


def recorder_process(
    run: Run, index: int, *, queue: str, binding_key: str, prefix: str
) -> ServerProcess:
    env = {
        **os.environ,
        "POLOS_AMQP_URL": run.amqp_url,
        "POLOS_REDIS_URL": redis_url(),
        "POLOS_REDIS_KEY_PREFIX": prefix,
        "POLOS_RECORDER_QUEUE": queue,
        "POLOS_RECORDER_BINDING_KEY": binding_key,
    }
    return ServerProcess(
        f"recorder[{index}]",
        [sys.executable, "-m", "recorder"],
        env=env,
        log=run.directory / f"recorder-{queue}-{index}.log",
        cwd=run.config.tree,
        ready_log="recording events from",
    )


async def _publish_events(amqp_url: str, queue: str, binding_key: str, bodies: list[bytes]) -> None:
    """Declare the recorder queue as the recorder does, then publish every event confirmed,
    ``EVENTS_PER_MESSAGE`` to a batch as the gateway and dispatchers send them."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        await declare_recorder_queue(connection, queue, binding_key)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        project_id = orjson.loads(bodies[0])["project_id"] if bodies else ""
        batches = [
            encode_event_batch(bodies[i : i + EVENTS_PER_MESSAGE])
            for i in range(0, len(bodies), EVENTS_PER_MESSAGE)
        ]
        for start in range(0, len(batches), 100):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=event_batch_routing_key(project_id),
                    )
                    for body in batches[start : start + 100]
                )
            )
    finally:
        await connection.close()


async def _watch(
    redis: Any, index: str, count: int, timeout_s: float, roles: Callable[[], dict[str, list[int]]]
) -> tuple[int, int, float, dict[str, float]]:
    """Poll the index of recorded executions from the first record to the last (or the
    timeout): records in all, those counted in between, the seconds it took, and the
    cores each role used meanwhile."""
    deadline = time.monotonic() + timeout_s
    first: tuple[float, int, cpu.CpuSnapshot] | None = None
    while True:
        n = int(await redis.zcard(index))
        now = time.monotonic()
        if first is None and n > 0:
            first = (now, n, cpu.snapshot(now, roles()))
        if n >= count or now >= deadline:
            break
        await asyncio.sleep(0.005)
    if first is None:
        return 0, 0, 0.0, {}
    return n, n - first[1], now - first[0], cpu.cores_used(first[2], cpu.snapshot(now, roles()))


async def recorder_phase(run: Run, processes: int) -> Measurement:
    config = run.config
    count = config.recorder_events
    tag = run.next_queue()
    project_id = f"{run.run_id}r{tag}"
    queue = f"bench.recorder.{run.run_id}.{tag}"
    binding_key = f"{project_id}.#"
    prefix = f"{run.redis_prefix}{tag}:"
    run.queues.append(queue)
    system = f"recorder, {processes} process{'es' if processes > 1 else ''}"
    run.progress.phase(f"{system}: publish {count:,} events, then drain them")
    bodies = [queued_event(project_id, _EVENTS_QUEUE_NAME)[1] for _ in range(count)]
    redis = open_redis(redis_url())
    try:
        await _publish_events(run.amqp_url, queue, binding_key, bodies)
        busy_before = await run.quiet()
        load_before = cpu.loadavg()
        recorders = [
            recorder_process(run, i, queue=queue, binding_key=binding_key, prefix=prefix)
            for i in range(processes)
        ]
        broker = cpu.find_broker_pids()
        # Where the recorder writes (the shared Redis: what else uses it meanwhile counts).
        redis_pids = cpu.find_redis_pids()

        def roles() -> dict[str, list[int]]:
            pids = [p for r in recorders if r.started for p in r.pids()]
            return {"recorder": pids, "broker": broker, "redis": redis_pids}

        index = index_key(prefix, project_id, WORKFLOW)
        watch = asyncio.create_task(_watch(redis, index, count, 60.0 + count / 500, roles))
        try:
            async with running(*recorders):
                total, recorded, seconds, cores = await watch
        finally:
            watch.cancel()
    finally:
        await redis.aclose()
        await delete_queues(run.amqp_url, [queue])
    nan = math.nan
    m = Measurement(
        key=f"recorder-{processes}",
        system=system,
        mode=f"{count:,} queued events waiting in its queue",
        duration_s=round(seconds, 3),
        ok=recorded,
        rate=recorded / seconds if seconds > 0 else 0.0,
        p50_ms=nan,
        p90_ms=nan,
        p99_ms=nan,
        p999_ms=nan,
        max_ms=nan,
        unsent=count - total,
        cpu=cores,
        loadavg_before=load_before,
    )
    m.extra["events"] = count
    m.extra["event_bytes"] = len(bodies[0])
    m.extra["events_per_message"] = EVENTS_PER_MESSAGE
    m.extra["busy_before_cores"] = busy_before
    run.record(m)
    return m


async def recorder_runs(run: Run) -> None:
    for processes in run.config.recorder_processes:
        await recorder_phase(run, processes)
