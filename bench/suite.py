"""The systems measured, and the order they run in.

Every system is measured in the same run, on the same broker, with the same
request body (and, for the bare publish loop, a message of the size the
gateway publishes for that body). The bare loop and the gateway alternate
(``--repeat``) so that each comparison is back to back; CPU use of every role
is recorded beside each figure, and so is what other processes used.

To add a system (issue 5: FastAPI + Celery, end to end, memory), write an
``async def _system(run: Run) -> None`` that appends ``Measurement``s to
``run.results`` and register it in ``SYSTEMS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import cpu
from bench.bare_publish import PublishSpec, publish_process
from bench.harness import run_processes
from bench.loadgen import HttpTarget, LoadSpec, load_process
from bench.servers import (
    WORKFLOW,
    ServerProcess,
    Tenant,
    bare_http_process,
    create_tenant,
    delete_queues,
    gateway_process,
)
from bench.stats import Measurement, summarize
from schemas.envelope import encode_submission
from schemas.ids import new_execution_id
from schemas.topology import submit_queue

PATH = f"/api/v1/workflows/{WORKFLOW}/run"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    amqp_url: str
    quick: bool = False
    connections: int = 64
    client_processes: int = 2
    warmup_s: float = 2.0
    duration_s: float = 15.0
    open_loop_fractions: tuple[float, ...] = (0.25, 0.5, 0.8)
    per_core_processes: int = 2
    engine: str = "raw"
    repeat: int = 2
    profile: bool = False
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    uvloop: bool = False
    wait_quiet_s: float = 0.0
    gateway_tree: Path | None = None
    results_dir: Path = Path("bench/results")


def request_body(queue_name: str) -> bytes:
    """What a Polos SDK client sends for a small job (unknown fields are ignored)."""
    return orjson.dumps(
        {
            "payload": {
                "order_id": 184467,
                "customer": "cus_9f3a1c",
                "items": [{"sku": "A-1001", "qty": 2}, {"sku": "B-2002", "qty": 1}],
            },
            "queue_name": queue_name,
            "user_id": "user_42",
            "session_id": "sess_5d1e7b",
            "batch_id": None,
        }
    )


def envelope_like(project_id: str, queue_name: str) -> bytes:
    """A message the size of what the gateway publishes for ``request_body``."""
    body = orjson.loads(request_body(queue_name))
    execution_id, created_at = new_execution_id()
    return encode_submission(
        execution_id=execution_id,
        created_at=created_at,
        project_id=project_id,
        workflow_id=WORKFLOW,
        deployment_id="bench-v1",
        queue_name=queue_name,
        queue_concurrency_limit=None,
        concurrency_key=None,
        run_timeout_seconds=3600,
        payload=body["payload"],
        initial_state=None,
        session_id=body["session_id"],
        user_id=body["user_id"],
        otel_traceparent=None,
        parent_execution_id=None,
        root_execution_id=None,
        step_key=None,
        wait_for_subworkflow=False,
        submitted_by="key_0123456789abcdef",
    )


Progress = Callable[[Measurement], None]


@dataclass
class Run:
    config: BenchConfig
    run_id: str
    directory: Path
    progress: Progress
    results: list[Measurement] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    _tenant: Tenant | None = None
    _phase: int = 0

    def next_queue(self) -> str:
        """A fresh queue_name per phase: each starts on an empty queue."""
        self._phase += 1
        return f"p{self._phase}"

    async def tenant(self) -> Tenant:
        if self._tenant is None:
            self._tenant = await create_tenant(self.config.amqp_url, self.directory, self.run_id)
        return self._tenant

    def record(self, measurement: Measurement) -> None:
        self.results.append(measurement)
        self.progress(measurement)


async def _quiet(config: BenchConfig) -> float | None:
    if config.wait_quiet_s <= 0:
        return None
    return await cpu.wait_until_quiet(config.wait_quiet_s)


def _mode(config: BenchConfig, rate: float | None) -> str:
    if rate is None:
        return f"closed loop, {config.connections} conns"
    return f"open loop, {rate:,.0f}/s"


async def _measure_http(
    run: Run,
    *,
    key: str,
    system: str,
    servers: Sequence[ServerProcess],
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    rate: float | None = None,
    role: str = "gateway",
) -> Measurement:
    config = run.config
    for server in servers:
        server.check_alive()
    spec = LoadSpec(
        targets=tuple(HttpTarget("127.0.0.1", s.port) for s in servers),
        path=PATH,
        headers=headers,
        body=body,
        connections=config.connections,
        processes=config.client_processes,
        rate=rate,
        engine=config.engine,
    )
    busy_before = await _quiet(config)
    load_before = cpu.loadavg()
    reports, cores = await run_processes(
        load_process,
        [spec.share(i) for i in range(config.client_processes)],
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        role="loadgen",
        watch={role: [s.pid for s in servers], "broker": cpu.find_broker_pids()},
    )
    measurement = summarize(
        reports,
        key=key,
        system=system,
        mode=_mode(config, rate),
        duration_s=config.duration_s,
        offered_rate=rate,
    )
    for server in servers:
        server.check_alive()
    measurement.cpu = cores
    measurement.loadavg_before = load_before
    measurement.extra["busy_before_cores"] = busy_before
    measurement.extra["engine"] = config.engine
    measurement.extra["client_processes"] = config.client_processes
    return measurement


async def _bare_publish(run: Run) -> None:
    await _bare_loop(run, "aio-pika")


async def _bare_publish_ours(run: Run) -> None:
    await _bare_loop(run, "broker.publisher")


_BARE = {
    "aio-pika": ("bare-publish", "bare aio-pika confirmed publish"),
    "broker.publisher": ("bare-publish-ours", "bare broker.publisher confirmed publish"),
}


async def _bare_loop(run: Run, client: str) -> None:
    config = run.config
    key, system = _BARE[client]
    queue = submit_queue(run.run_id, f"bare{run.next_queue()}")
    run.queues.append(queue)
    spec = PublishSpec(
        amqp_url=config.amqp_url,
        queue=queue,
        body=envelope_like(run.run_id, "p0"),
        inflight=config.connections,
        client=client,
    )
    busy_before = await _quiet(config)
    load_before = cpu.loadavg()
    reports, cores = await run_processes(
        publish_process,
        [spec],
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        role="publisher",
        watch={"broker": cpu.find_broker_pids()},
    )
    measurement = summarize(
        reports,
        key=key,
        system=system,
        mode=f"{config.connections} in flight, 1 channel",
        duration_s=config.duration_s,
    )
    measurement.cpu = cores
    measurement.loadavg_before = load_before
    measurement.extra["message_bytes"] = len(spec.body)
    measurement.extra["busy_before_cores"] = busy_before
    run.record(measurement)
    await delete_queues(config.amqp_url, [queue])


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
    measurement = await _measure_http(
        run,
        key=key,
        system=system,
        servers=servers,
        body=request_body(queue_name),
        headers=tenant.headers,
        rate=rate,
    )
    measurement.extra["processes"] = len(servers)
    if run.config.gateway_env:
        measurement.extra["gateway_env"] = dict(run.config.gateway_env)
    if run.config.uvloop:
        measurement.extra["uvloop"] = True
    if run.config.gateway_tree:
        measurement.extra["gateway_tree"] = str(run.config.gateway_tree)
    run.record(measurement)
    await delete_queues(run.config.amqp_url, [queue])
    return measurement


@contextlib.asynccontextmanager
async def _gateways(run: Run, count: int) -> Any:
    tenant = await run.tenant()
    servers = [
        gateway_process(
            i,
            amqp_url=run.config.amqp_url,
            tenant=tenant,
            directory=run.directory,
            extra_env=run.config.gateway_env,
            uvloop=run.config.uvloop,
            tree=run.config.gateway_tree,
        )
        for i in range(count)
    ]
    try:
        for server in servers:
            await server.start()
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def _gateway_vs_bare(run: Run, *, with_bare: bool) -> None:
    """Gateway, one process: alternating with the bare loop, then open loop below saturation."""
    config = run.config
    async with _gateways(run, 1) as servers:
        saturation: list[float] = []
        for _ in range(config.repeat):
            if with_bare:
                await _bare_publish(run)
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
                rate=max(1.0, round(best * fraction, -1)),
            )
            m.extra["fraction_of_saturation"] = fraction


async def _gateway(run: Run) -> None:
    await _gateway_vs_bare(run, with_bare=False)


async def _gateway_with_limit(run: Run) -> None:
    await _gateway_vs_bare(run, with_bare=True)


async def _gateway_per_core(run: Run) -> None:
    count = run.config.per_core_processes
    async with _gateways(run, count) as servers:
        await _gateway_phase(
            run, servers, key="gateway-per-core", system=f"gateway, {count} processes"
        )


async def _bare_http(run: Run) -> None:
    server = bare_http_process(run.directory)
    await server.start()
    try:
        measurement = await _measure_http(
            run,
            key="bare-http",
            system="bare aiohttp handler (no broker)",
            servers=[server],
            body=request_body("p0"),
            headers=(("Content-Type", "application/json"),),
            role="server",
        )
    finally:
        await server.stop()
    run.record(measurement)


async def _profile(run: Run, server: ServerProcess) -> None:
    """A closed-loop phase with py-spy sampling the gateway (not a measured figure)."""
    from bench.profile import record_profile

    py_spy = _find_py_spy()
    out = run.config.results_dir / f"{run.run_id}-gateway-profile.txt"
    seconds = run.config.warmup_s + run.config.duration_s + 1
    # Wait for quiet before py-spy starts counting its seconds, not inside them.
    await _quiet(run.config)
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


def _find_py_spy() -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return py_spy


System = Callable[[Run], Awaitable[None]]

SYSTEMS: dict[str, System] = {
    "bare-publish": _bare_publish,
    "bare-publish-ours": _bare_publish_ours,
    "bare-http": _bare_http,
    "gateway-1": _gateway,
    "gateway-per-core": _gateway_per_core,
}
GROUPS: dict[str, tuple[str, ...]] = {
    # Issue 2: the gateway against the broker's limit, one process and one per core.
    "gateway": ("bare-publish", "gateway-1", "gateway-per-core", "bare-publish-ours"),
    "all": ("bare-publish", "gateway-1", "gateway-per-core", "bare-publish-ours", "bare-http"),
}


def expand(names: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for name in names or ["all"]:
        for system in GROUPS.get(name, (name,)):
            if system not in SYSTEMS:
                raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
            if system not in chosen:
                chosen.append(system)
    return chosen


async def run_suite(config: BenchConfig, systems: Sequence[str], progress: Progress) -> Run:
    run_id = f"bench{uuid.uuid4().hex[:8]}"
    directory = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    run = Run(config, run_id, directory, progress)
    chosen = list(systems)
    try:
        if "gateway-1" in chosen and "bare-publish" in chosen:
            # Back to back, alternating: the ratio is the figure.
            await _gateway_with_limit(run)
            chosen = [s for s in chosen if s not in ("gateway-1", "bare-publish")]
        for name in chosen:
            await SYSTEMS[name](run)
    finally:
        with contextlib.suppress(Exception):
            await delete_queues(config.amqp_url, run.queues)
        shutil.rmtree(directory, ignore_errors=True)
    return run


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "broker", "schemas", "gateway"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}+dirty" if dirty else rev
