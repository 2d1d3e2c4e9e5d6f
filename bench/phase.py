"""What every system shares: the configuration, the run's state, the request body, and
one measured HTTP phase (load processes, CPU per role, memory, live figures).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import cpu
from bench.harness import Live, Window, run_processes
from bench.loadgen import STAMP, HttpTarget, LoadSpec, load_process
from bench.progress import Progress
from bench.servers import (
    WORKFLOW,
    ServerProcess,
    Tenant,
    create_tenant,
    delete_queues,
    purge_queues,
)
from bench.stats import Measurement, summarize
from schemas.envelope import make_submission
from schemas.ids import new_execution_id

PATH = f"/api/v1/workflows/{WORKFLOW}/run"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    amqp_url: str
    quick: bool = False
    connections: int = 64
    client_processes: int = 2
    warmup_s: float = 2.0
    duration_s: float = 10.0
    open_loop_fractions: tuple[float, ...] = (0.25, 0.5, 0.8)
    e2e_fractions: tuple[float, ...] = (0.5,)
    e2e_rates: tuple[float, ...] = ()  # fixed executions/s (A/B comparisons)
    per_core_processes: int = 2
    engine: str = "raw"
    repeat: int = 2
    profile: bool = False
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    wait_quiet_s: float = 0.0
    gateway_tree: Path | None = None
    tree: Path | None = None  # dispatchers and workers from another checkout
    results_dir: Path = Path("bench/results")
    keep_logs: Path | None = None  # copy the processes' logs here at the end
    # End to end: submission queues, the concurrency limit of each, worker concurrency.
    e2e_queues: int = 4
    e2e_limit: int = 64
    worker_concurrency: int = 256
    queued_submissions: int = 100_000
    scaling_queues: int = 16
    celery_pool: str = "prefork"
    celery_concurrency: int = 2
    # Issue 4: records the status reads cycle through, items per batch_run, events queued
    # for the recorder, and how many recorder processes drain them (one run each).
    status_records: int = 5_000
    batch_size: int = 100
    batch_connections: int = 8
    recorder_events: int = 20_000
    recorder_processes: tuple[int, ...] = (1, 2)


def request_body(queue_name: str, *, limit: int | None = None) -> bytes:
    """What a Polos SDK client sends for a small job (unknown fields are ignored).

    ``sent_at`` is replaced in every request by the time it was sent
    (``bench.loadgen.STAMP``); the benchmark workers read it back.
    """
    body: dict[str, Any] = {
        "payload": {
            "order_id": 184467,
            "customer": "cus_9f3a1c",
            "items": [{"sku": "A-1001", "qty": 2}, {"sku": "B-2002", "qty": 1}],
            "sent_at": STAMP.decode(),
        },
        "queue_name": queue_name,
        "user_id": "user_42",
        "session_id": "sess_5d1e7b",
        "batch_id": None,
    }
    if limit is not None:
        body["queue_concurrency_limit"] = limit
    return orjson.dumps(body)


def submission(
    project_id: str, queue_name: str, *, deployment_id: str = "bench-v1", sent_at: str = "0"
) -> bytes:
    """An envelope as the gateway publishes it for ``request_body`` (for direct publishing)."""
    body = orjson.loads(request_body(queue_name))
    body["payload"]["sent_at"] = sent_at
    execution_id, created_at = new_execution_id()
    return make_submission(
        execution_id=execution_id,
        created_at=created_at,
        project_id=project_id,
        workflow_id=WORKFLOW,
        deployment_id=deployment_id,
        queue_name=queue_name,
        run_timeout_seconds=3600,
        payload=body["payload"],
        session_id=body["session_id"],
        user_id=body["user_id"],
        submitted_by="key_0123456789abcdef",
    )


@dataclass
class Run:
    config: BenchConfig
    run_id: str
    directory: Path
    progress: Progress
    amqp_url: str  # the run's own vhost when it has one
    vhost: str | None = None
    results: list[Measurement] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    _tenant: Tenant | None = None
    _phase: int = 0

    @property
    def redis_prefix(self) -> str:
        """The run's own Redis key prefix (its gateways read the execution store there);
        its keys are deleted at the end of the run."""
        return f"bench:{self.run_id}:"

    def next_queue(self) -> str:
        """A fresh queue_name per phase: each starts on an empty queue."""
        self._phase += 1
        return f"p{self._phase}"

    async def tenant(self) -> Tenant:
        if self._tenant is None:
            self._tenant = await create_tenant(self.amqp_url, self.directory, self.run_id)
        return self._tenant

    def record(self, measurement: Measurement) -> None:
        self.results.append(measurement)
        self.progress.done(measurement)

    def remember_memory(self, process: str, state: str, rss_mb: float, **extra: Any) -> None:
        entry = {"process": process, "state": state, "rss_mb": round(rss_mb, 1)}
        self.memory.append({**entry, **extra})

    async def discard(self, queues: Sequence[str]) -> None:
        """Done with these queues: in the run's own vhost, drop their messages (the vhost
        goes at the end, and a purge is cheaper than a quorum queue's deletion); otherwise
        delete them now."""
        if self.vhost is not None:
            await purge_queues(self.amqp_url, queues)
        else:
            await delete_queues(self.amqp_url, queues)

    async def quiet(self) -> float | None:
        if self.config.wait_quiet_s <= 0:
            return None
        return await cpu.wait_until_quiet(self.config.wait_quiet_s)


def mode(config: BenchConfig, rate: float | None) -> str:
    if rate is None:
        return f"closed loop, {config.connections} conns"
    return f"open loop, {rate:,.0f}/s"


def rss(pids: Sequence[int]) -> float:
    return sum(cpu.rss_mb(p) for p in pids)


LiveText = Callable[[Live], str]


@dataclass
class HttpPhase:
    """One measured HTTP phase: what to drive, and what else to watch meanwhile."""

    key: str
    system: str
    servers: Sequence[ServerProcess]
    bodies: tuple[bytes, ...]
    headers: tuple[tuple[str, str], ...]
    rate: float | None = None
    role: str = "gateway"
    # Other processes under test (dispatcher, worker, ...): CPU and memory per role.
    others: Mapping[str, Sequence[int]] = field(default_factory=dict)
    live_extra: LiveText | None = None
    path: str = PATH
    method: str = "POST"
    paths: tuple[str, ...] = ()  # cycled through per connection instead of ``path``
    connections: int | None = None  # instead of the configured number
    unique_header: str | None = None  # a header whose value no two requests share


@dataclass
class HttpResult:
    measurement: Measurement
    window: Window
    rss_rest: dict[str, float]
    rss_peak: dict[str, float]


async def measure_http(run: Run, phase: HttpPhase) -> HttpResult:
    config = run.config
    for server in phase.servers:
        server.check_alive()
    connections = phase.connections or config.connections
    processes = max(1, min(config.client_processes, connections))
    spec = LoadSpec(
        targets=tuple(HttpTarget("127.0.0.1", s.port) for s in phase.servers),
        path=phase.path,
        headers=phase.headers,
        bodies=phase.bodies,
        connections=connections,
        processes=processes,
        rate=phase.rate,
        engine=config.engine,
        method=phase.method,
        paths=phase.paths,
        unique_header=phase.unique_header,
    )
    server_pids = [p for s in phase.servers for p in s.pids()]
    roles: dict[str, Sequence[int]] = {phase.role: server_pids, **phase.others}
    busy_before = await run.quiet()
    load_before = cpu.loadavg()
    rss_rest = {role: rss(pids) for role, pids in roles.items()}
    rss_peak = dict(rss_rest)
    last: list[tuple[float, int]] = []

    def watcher(live: Live) -> None:
        for role, pids in roles.items():
            rss_peak[role] = max(rss_peak[role], rss(pids))
        last.append((live.elapsed_s, live.ok))
        rate = 0.0
        if len(last) >= 2 and last[-1][0] > last[-2][0]:
            rate = (last[-1][1] - last[-2][1]) / (last[-1][0] - last[-2][0])
        where = f"{live.elapsed_s:4.1f}/{config.duration_s:g} s"
        if live.elapsed_s < 0:
            where = "warm-up"
        text = f"{where}  {rate:8,.0f} ok/s"
        if phase.live_extra is not None:
            text += "  " + phase.live_extra(live)
        run.progress.live(text)

    outcome = await run_processes(
        load_process,
        [spec.share(i) for i in range(processes)],
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        role="loadgen",
        watch={**roles, "broker": cpu.find_broker_pids()},
        watcher=watcher,
    )
    measurement = summarize(
        outcome.reports,
        key=phase.key,
        system=phase.system,
        mode=mode(dataclasses.replace(config, connections=connections), phase.rate),
        duration_s=config.duration_s,
        offered_rate=phase.rate,
    )
    for server in phase.servers:
        server.check_alive()
    measurement.cpu = outcome.cores
    measurement.loadavg_before = load_before
    measurement.extra["busy_before_cores"] = busy_before
    measurement.extra["engine"] = config.engine
    measurement.extra["client_processes"] = processes
    measurement.extra["rss_mb"] = {
        role: {"rest": round(rss_rest[role], 1), "peak": round(rss_peak[role], 1)} for role in roles
    }
    return HttpResult(measurement, outcome.window, rss_rest, rss_peak)


async def gather_quietly(*aws: Any) -> None:
    await asyncio.gather(*aws, return_exceptions=True)


def fraction_rate(saturation: float, fraction: float) -> float:
    if math.isnan(saturation) or saturation <= 0:
        return 10.0
    return max(10.0, round(saturation * fraction, -1))
