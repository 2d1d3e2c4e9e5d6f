"""Submission systems: how fast a confirmed submission is accepted.

- the limits: a bare aio-pika confirmed-publish loop (and the same loop through
  our own publisher), and a bare aiohttp handler (no broker);
- ours: the gateway, one process and one per core;
- the peer: FastAPI + pydantic + Celery ``send_task`` with publisher confirms.

Every HTTP system gets the same requests from the same load generator; the
bare loops publish a message of the size the gateway publishes for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from bench import cpu
from bench.bare_publish import PublishSpec, publish_process
from bench.harness import run_processes
from bench.phase import (
    HttpPhase,
    Run,
    fraction_rate,
    measure_http,
    request_body,
    submission,
)
from bench.servers import (
    ServerProcess,
    bare_http_process,
    gateway_process,
    peer_server_process,
    purge_queues,
    running,
)
from bench.stats import Measurement, summarize
from schemas.topology import submit_queue

# More phases on the gateway of ``gateway_vs_bare`` (status reads, batch submits).
Then = Callable[[Sequence[ServerProcess]], Awaitable[None]]

_BARE = {
    "aio-pika": ("bare-publish", "bare aio-pika confirmed publish"),
    "broker.publisher": ("bare-publish-ours", "bare broker.publisher confirmed publish"),
}


async def bare_loop(run: Run, client: str) -> None:
    config = run.config
    key, system = _BARE[client]
    queue = submit_queue(run.run_id, f"bare{run.next_queue()}")
    run.queues.append(queue)
    spec = PublishSpec(
        amqp_url=run.amqp_url,
        queue=queue,
        body=submission(run.run_id, "p0", sent_at="0000000000.000000"),
        inflight=config.connections,
        client=client,
    )
    run.progress.phase(f"{system}: {config.connections} in flight")
    busy_before = await run.quiet()
    load_before = cpu.loadavg()
    outcome = await run_processes(
        publish_process,
        [spec],
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        role="publisher",
        watch={"broker": cpu.find_broker_pids()},
        watcher=lambda live: run.progress.live(f"{live.elapsed_s:4.1f} s  {live.ok:,} confirmed"),
    )
    measurement = summarize(
        outcome.reports,
        key=key,
        system=system,
        mode=f"{config.connections} in flight, 1 channel",
        duration_s=config.duration_s,
    )
    measurement.cpu = outcome.cores
    measurement.loadavg_before = load_before
    measurement.extra["message_bytes"] = len(spec.body)
    measurement.extra["busy_before_cores"] = busy_before
    run.record(measurement)
    await run.discard([queue])


async def bare_publish(run: Run) -> None:
    await bare_loop(run, "aio-pika")


async def bare_publish_ours(run: Run) -> None:
    await bare_loop(run, "broker.publisher")


async def _gateway_phase(
    run: Run,
    servers: Sequence[ServerProcess],
    *,
    key: str,
    system: str,
    rate: float | None = None,
) -> Measurement:
    tenant = await run.tenant()
    queue_name = run.next_queue()
    queue = submit_queue(tenant.project_id, queue_name)
    run.queues.append(queue)
    phase = HttpPhase(
        key=key,
        system=system,
        servers=servers,
        bodies=(request_body(queue_name),),
        headers=tenant.headers,
        rate=rate,
    )
    run.progress.phase(f"{system}: {'closed loop' if rate is None else f'{rate:,.0f}/s'}")
    result = await measure_http(run, phase)
    measurement = result.measurement
    measurement.extra["processes"] = len(servers)
    if run.config.gateway_env:
        measurement.extra["gateway_env"] = dict(run.config.gateway_env)
    if run.config.gateway_tree:
        measurement.extra["gateway_tree"] = str(run.config.gateway_tree)
    run.record(measurement)
    await run.discard([queue])
    return measurement


@contextlib.asynccontextmanager
async def gateways(run: Run, count: int) -> AsyncIterator[list[ServerProcess]]:
    tenant = await run.tenant()
    servers = [
        gateway_process(
            i,
            amqp_url=run.amqp_url,
            tenant=tenant,
            directory=run.directory,
            extra_env={"POLOS_REDIS_KEY_PREFIX": run.redis_prefix, **run.config.gateway_env},
            tree=run.config.gateway_tree,
        )
        for i in range(count)
    ]
    async with running(*servers):
        yield servers


async def gateway_vs_bare(run: Run, *, with_bare: bool, then: Then | None = None) -> None:
    """Gateway, one process: alternating with the bare loop, then open loop below saturation
    (and ``then``, more phases on the same gateway)."""
    config = run.config
    async with gateways(run, 1) as servers:
        saturation: list[float] = []
        for _ in range(config.repeat):
            if with_bare:
                await bare_publish(run)
            m = await _gateway_phase(run, servers, key="gateway-1", system="gateway, 1 process")
            saturation.append(m.rate)
        if config.profile:
            await _profile(run, servers[0])
        best = max(saturation)
        for fraction in config.open_loop_fractions:
            m = await _gateway_phase(
                run,
                servers,
                key="gateway-1",
                system="gateway, 1 process",
                rate=fraction_rate(best, fraction),
            )
            m.extra["fraction_of_saturation"] = fraction
        if then is not None:
            await then(servers)


async def gateway_1(run: Run, then: Then | None = None) -> None:
    await gateway_vs_bare(run, with_bare=False, then=then)


async def gateway_per_core(run: Run) -> None:
    count = run.config.per_core_processes
    async with gateways(run, count) as servers:
        await _gateway_phase(
            run, servers, key="gateway-per-core", system=f"gateway, {count} processes"
        )


async def bare_http(run: Run) -> None:
    server = bare_http_process(run.directory)
    await server.start()
    try:
        run.progress.phase("bare aiohttp handler (no broker): closed loop")
        result = await measure_http(
            run,
            HttpPhase(
                key="bare-http",
                system="bare aiohttp handler (no broker)",
                servers=[server],
                bodies=(request_body("p0"),),
                headers=(("Content-Type", "application/json"),),
                role="server",
            ),
        )
    finally:
        await server.stop()
    run.record(result.measurement)


PEER_SYSTEM = "FastAPI + Celery send_task"


def peer_queue(run: Run) -> str:
    return f"bench.celery.{run.run_id}"


@contextlib.asynccontextmanager
async def peer_server(run: Run) -> AsyncIterator[ServerProcess]:
    queue = peer_queue(run)
    server = peer_server_process(amqp_url=run.amqp_url, queue=queue, directory=run.directory)
    run.queues.append(queue)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def peer_phase(run: Run, server: ServerProcess, rate: float | None) -> Measurement:
    tenant = await run.tenant()
    run.progress.phase(f"{PEER_SYSTEM}: {'closed loop' if rate is None else f'{rate:,.0f}/s'}")
    result = await measure_http(
        run,
        HttpPhase(
            key="peer",
            system=PEER_SYSTEM,
            servers=[server],
            bodies=(request_body("p0"),),
            headers=tenant.headers,
            rate=rate,
            role="server",
        ),
    )
    run.record(result.measurement)
    # Nothing consumes the queue in this part: drop what piled up.
    await purge_queues(run.amqp_url, [peer_queue(run)])
    return result.measurement


async def peer_submissions(run: Run, server: ServerProcess) -> float:
    """The peer at saturation, then open loop below it; returns the saturation rate."""
    saturation = (await peer_phase(run, server, None)).rate
    # --quick: the open-loop comparison is the gateway's alone, to stay under a minute.
    for fraction in () if run.config.quick else run.config.open_loop_fractions:
        m = await peer_phase(run, server, fraction_rate(saturation, fraction))
        m.extra["fraction_of_saturation"] = fraction
    return saturation


async def _profile(run: Run, server: ServerProcess) -> None:
    """A closed-loop phase with py-spy sampling the gateway (not a measured figure)."""
    from bench.profile import record_profile

    py_spy = find_py_spy()
    out = run.config.results_dir / f"{run.run_id}-gateway-profile.txt"
    seconds = run.config.warmup_s + run.config.duration_s + 1
    # Wait for quiet before py-spy starts counting its seconds, not inside them.
    await run.quiet()
    config, run.config = run.config, dataclasses.replace(run.config, wait_quiet_s=0.0)
    try:
        async with record_profile(py_spy, server.pid, out, seconds=seconds):
            m = await _gateway_phase(
                run, [server], key="gateway-1-profiled", system="gateway, 1 process, under py-spy"
            )
    finally:
        run.config = config
    m.extra["profile"] = str(out)
    run.artifacts["profile"] = str(out)


def find_py_spy() -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return py_spy
