"""The systems measured, and the order they run in.

Every system is measured in the same run, on the same broker (in a vhost of
the run's own, ``bench.vhost``), with the same request body (and, for the
bare publish loops, a message of the size the gateway publishes for that
body). The bare loop and the gateway alternate (``--repeat``) so that each
comparison is back to back; CPU use of every role is recorded beside each
figure, and so is what other processes used.

Systems are grouped by the processes they need, which start once per group:
the gateway phases, the peer (FastAPI, then its Celery worker behind it), our
end-to-end pipeline (gateway, dispatcher, worker; the dispatcher's memory
with a deep backlog is measured there too), and the dispatcher scaling runs.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench import dispatchers, e2e, idempotency, reads, submit
from bench.phase import BenchConfig, Run
from bench.progress import Progress
from bench.servers import ServerProcess, delete_queues
from bench.vhost import own_vhost

SYSTEMS: dict[str, str] = {
    "bare-publish": "the limit: a bare aio-pika confirmed-publish loop",
    "gateway-1": "the gateway, one process (and open loop below saturation)",
    "gateway-per-core": "one gateway process per core",
    "bare-publish-ours": "the bare loop through broker.publisher",
    "bare-http": "the HTTP limit: a bare aiohttp handler",
    "peer": "FastAPI + pydantic + Celery send_task (and open loop)",
    "peer-e2e": "the peer end to end: a Celery worker behind it",
    "e2e": "ours end to end: gateway -> dispatcher -> worker",
    "dispatcher-memory": "dispatcher RSS with a deep backlog",
    "scaling": "executions/s with 1 vs 2 dispatchers over many queues",
    "status-reads": "GET /api/v1/executions/{id} from the gateway, records that exist",
    "batch-submit": "POST /api/v1/workflows/batch_run, submissions/s",
    "recorder": "the recorder's events/s draining a queue of lifecycle events",
    "idempotent-submit": "submits without a key, with a new Idempotency-Key each, all retries",
}
GROUPS: dict[str, tuple[str, ...]] = {
    # Issue 2: the gateway against the broker's limit, one process and one per core.
    "gateway": ("bare-publish", "gateway-1", "gateway-per-core", "bare-publish-ours"),
    "end-to-end": ("e2e", "peer-e2e", "dispatcher-memory", "scaling"),
    # Issue 4: status reads, batch submits, the recorder.
    "store": ("status-reads", "batch-submit", "recorder"),
    # Issue 12: what an idempotency key costs.
    "idempotency": ("idempotent-submit",),
    "all": tuple(SYSTEMS),
}
_OURS = ("broker", "schemas", "gateway", "dispatcher", "worker")
SCALING = (
    ("1 dispatcher", ("{project}/s{tag}q*",)),
    ("2 dispatchers, same patterns", ("{project}/s{tag}q*", "{project}/s{tag}q*")),
    ("2 dispatchers, split patterns", ("{project}/s{tag}q?[02468]", "{project}/s{tag}q?[13579]")),
)


def expand(names: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for name in names or ["all"]:
        for system in GROUPS.get(name, (name,)):
            if system not in SYSTEMS:
                raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
            if system not in chosen:
                chosen.append(system)
    return chosen


def _scaling_configs(config: BenchConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return SCALING[:2] if config.quick else SCALING


def expected_phases(config: BenchConfig, systems: Sequence[str]) -> int:
    """How many phases the run will have (for the progress display)."""
    opened = len(config.open_loop_fractions)
    e2e_runs = 1 + len(config.e2e_fractions) + len(config.e2e_rates)
    count = {
        "bare-publish": config.repeat,
        "gateway-1": config.repeat + opened + (1 if config.profile else 0),
        "gateway-per-core": 1,
        "bare-publish-ours": 1,
        "bare-http": 1,
        "peer": 1 + (0 if config.quick else opened),
        "peer-e2e": 1 if config.quick else e2e_runs,
        "e2e": e2e_runs + (1 if config.profile else 0),
        "dispatcher-memory": 1,
        "scaling": len(_scaling_configs(config)),
        "status-reads": 2,
        "batch-submit": 1,
        "recorder": len(config.recorder_processes),
        "idempotent-submit": idempotency.phases(config.repeat),
    }
    return sum(count[s] for s in systems)


async def _run_systems(run: Run, chosen: list[str]) -> None:
    config = run.config
    extras = [s for s in ("status-reads", "batch-submit", "idempotent-submit") if s in chosen]

    async def then(servers: Sequence[ServerProcess]) -> None:
        await reads.gateway_extras(run, servers, extras)
        if "idempotent-submit" in extras:
            await idempotency.idempotent_submits(run, servers)

    if "gateway-1" in chosen and "bare-publish" in chosen:
        # Back to back, alternating: the ratio is the figure.
        await submit.gateway_vs_bare(run, with_bare=True, then=then)
    elif "gateway-1" in chosen:
        await submit.gateway_1(run, then=then)
    elif extras:
        async with submit.gateways(run, 1) as servers:
            await then(servers)
    elif "bare-publish" in chosen:
        for _ in range(config.repeat):
            await submit.bare_publish(run)
    if "gateway-per-core" in chosen:
        await submit.gateway_per_core(run)
    if "bare-publish-ours" in chosen:
        await submit.bare_publish_ours(run)
    if "bare-http" in chosen:
        await submit.bare_http(run)
    if "peer" in chosen or "peer-e2e" in chosen:
        async with submit.peer_server(run) as server:
            if "peer" in chosen:
                await submit.peer_submissions(run, server)
            if "peer-e2e" in chosen:
                await e2e.peer_e2e(run, server)
    if "e2e" in chosen or "dispatcher-memory" in chosen:
        async with e2e.ours(run) as pipe:
            if "e2e" in chosen:
                await e2e.e2e_runs(run, pipe)
                if config.profile:
                    await e2e.profile_e2e(run, pipe)
            if "dispatcher-memory" in chosen:
                project = (await run.tenant()).project_id
                await dispatchers.backlog_memory(run, pipe.roles["dispatcher"], project)
    if "recorder" in chosen:
        await reads.recorder_runs(run)
    if "scaling" in chosen:
        project = (await run.tenant()).project_id
        async with dispatchers.scaling_worker(run, project) as (worker, records):
            for label, patterns in _scaling_configs(config):
                await dispatchers.scaling_phase(run, worker, records, patterns, label)


async def run_suite(config: BenchConfig, systems: Sequence[str], progress: Progress) -> Run:
    run_id = f"bench{uuid.uuid4().hex[:8]}"
    directory = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    with own_vhost(config.amqp_url, run_id) as (url, vhost):
        if vhost is not None:
            progress.note(f"RabbitMQ vhost {vhost} (deleted at the end)")
        run = Run(config, run_id, directory, progress, amqp_url=url, vhost=vhost)
        try:
            await _run_systems(run, list(systems))
        finally:
            if vhost is None:
                with contextlib.suppress(Exception):
                    await delete_queues(url, list(dict.fromkeys(run.queues)))
            with contextlib.suppress(Exception):
                await reads.delete_keys(run.redis_prefix)
            if config.keep_logs is None:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                shutil.copytree(directory, config.keep_logs / run_id, dirs_exist_ok=True)
                shutil.rmtree(directory, ignore_errors=True)
    return run


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *_OURS],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}+dirty" if dirty else rev
