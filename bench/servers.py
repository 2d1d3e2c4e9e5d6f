"""Processes under test, run as subprocesses, and the broker state they need.

Ours run exactly as a user runs them (``python -m gateway``, ``python -m
dispatcher``, ``python -m worker module:attr``, settings from ``POLOS_*``),
with a projects file and key of their own and a deployment registered through
the registry stream; the peer runs as its users run it (``uvicorn``, ``celery
worker``). Everything is named after one run id so that runs never collide
with each other or with tests, and every queue a run creates is deleted at
the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from bench.cpu import process_tree
from broker.registry import register_deployment
from gateway.auth import create_key
from schemas.topology import work_queue

DEPLOYMENT = "bench-v1"
WORKFLOW = "bench_submit"


@dataclass(frozen=True, slots=True)
class Tenant:
    project_id: str
    api_key: str
    projects_file: Path

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return (
            ("Authorization", f"Bearer {self.api_key}"),
            ("X-Project-ID", self.project_id),
            ("Content-Type", "application/json"),
        )


async def create_tenant(amqp_url: str, directory: Path, project_id: str) -> Tenant:
    """A project with a key in a projects file of its own, and a registered deployment."""
    projects_file = directory / "projects.json"
    key, _ = create_key(projects_file, project_id)
    await register_deployment(amqp_url, project_id, DEPLOYMENT, [WORKFLOW])
    return Tenant(project_id, key, projects_file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


ReadyCheck = Callable[[], Awaitable[bool]]


class ServerProcess:
    """A subprocess under test, ready when its ``GET /ready`` answers 200 (a server), when
    its log shows ``ready_log``, or when ``ready_check`` says so."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int = 0,
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
        ready_log: str | None = None,
        ready_check: ReadyCheck | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.name = name
        self._cwd = cwd
        self.port = port
        self._argv = list(argv)
        self._env = dict(env)
        self._log_path = log
        self._ready_log = ready_log
        self._ready_check = ready_check
        self._stop_signal = stop_signal
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def started(self) -> bool:
        return self._process is not None

    def pids(self) -> list[int]:
        """The process and its children (a Celery pool's processes)."""
        return process_tree(self.pid)

    @property
    def log_path(self) -> Path:
        return self._log_path

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self, *, ready_timeout_s: float = 30.0) -> None:
        self._process = self._spawn()
        try:
            async with asyncio.timeout(ready_timeout_s):
                while not await self._ready():
                    if self._process.poll() is not None:
                        raise RuntimeError(self._failure("exited during start"))
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise RuntimeError(self._failure("not ready in time")) from None

    async def _ready(self) -> bool:
        if self._ready_check is not None:
            return await self._ready_check()
        if self._ready_log is not None:
            return self._ready_log in self.log_text()
        url = f"http://127.0.0.1:{self.port}/ready"
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    return response.status == 200
        return False

    def check_alive(self) -> None:
        """Raise if the server exited (e.g. killed by someone else on a shared machine)."""
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(self._failure("is not running"))

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self._log_path, "ab") as log:
            return subprocess.Popen(
                self._argv, env=self._env, cwd=self._cwd, stdout=log, stderr=subprocess.STDOUT
            )

    def _failure(self, what: str) -> str:
        tail = self.log_text()[-2000:]
        return f"{self.name} {what}; log {self._log_path}:\n{tail}"

    async def stop(self) -> None:
        """Stop it gracefully; kill it if that takes longer than ``stop_timeout_s``."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self._stop_signal)
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=self._stop_timeout_s)
        except TimeoutError:
            process.kill()
            await asyncio.to_thread(process.wait)


@contextlib.asynccontextmanager
async def running(*servers: ServerProcess) -> Any:
    """Start the servers together; stop them (together) on exit."""
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield servers
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


def gateway_process(
    index: int,
    *,
    amqp_url: str,
    tenant: Tenant,
    directory: Path,
    extra_env: Mapping[str, str],
    tree: Path | None = None,
) -> ServerProcess:
    """A gateway as a user runs it; ``tree``: from another checkout (before/after runs)."""
    port = free_port()
    env = {
        **os.environ,
        "POLOS_AMQP_URL": amqp_url,
        "POLOS_HOST": "127.0.0.1",
        "POLOS_PORT": str(port),
        "POLOS_PROJECTS_FILE": str(tenant.projects_file),
        **extra_env,
    }
    return ServerProcess(
        f"gateway[{index}]",
        [sys.executable, "-m", "gateway"],
        port=port,
        env=env,
        log=directory / f"gateway-{index}.log",
        cwd=tree,
    )


def dispatcher_process(
    index: int,
    *,
    amqp_url: str,
    queues: str,
    directory: Path,
    name: str = "dispatcher",
    tree: Path | None = None,
    metrics_port: int | None = None,
) -> ServerProcess:
    """``python -m dispatcher`` owning the queues that match ``queues``, no execution store
    (its queue would keep every event of the run: no recorder runs here); with
    ``metrics_port``, its ``GET /metrics`` there."""
    env = {
        **os.environ,
        "POLOS_AMQP_URL": amqp_url,
        "POLOS_DISPATCHER_QUEUES": queues,
        "POLOS_DISPATCHER_DECLARE_RECORDER_QUEUE": "false",
        # Stopped at the end of a phase whose backlog is not wanted any more.
        "POLOS_DISPATCHER_DRAIN_TIMEOUT_SECONDS": "0.5",
    }
    if metrics_port is not None:
        env["POLOS_METRICS_PORT"] = str(metrics_port)
    return ServerProcess(
        f"{name}[{index}]",
        [sys.executable, "-m", "dispatcher"],
        env=env,
        log=directory / f"{name}-{index}.log",
        cwd=tree,
        ready_log="dispatcher ready",
        # What it still holds then is requeued to a queue about to be purged.
        stop_timeout_s=1.0,
    )


def worker_process(
    *,
    amqp_url: str,
    project_id: str,
    records: Path,
    directory: Path,
    concurrency: int,
    tree: Path | None = None,
) -> ServerProcess:
    """``python -m worker bench.e2e_worker:create``: our worker SDK with a no-op workflow."""
    env = {
        **os.environ,
        "POLOS_AMQP_URL": amqp_url,
        "POLOS_WORKER_CONCURRENCY": str(concurrency),
        "POLOS_WORKER_DRAIN_TIMEOUT_SECONDS": "2",
        "BENCH_PROJECT": project_id,
        "BENCH_DEPLOYMENT": DEPLOYMENT,
        "BENCH_WORKFLOW": WORKFLOW,
        "BENCH_RECORDS": str(records),
    }
    return ServerProcess(
        "worker",
        [sys.executable, "-m", "worker", "bench.e2e_worker:create", "--log-level", "WARNING"],
        env=env,
        log=directory / "worker.log",
        cwd=tree,
        ready_check=lambda: has_consumer(amqp_url, work_queue(project_id, DEPLOYMENT)),
    )


def _peer_env(amqp_url: str, queue: str, records: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "BENCH_PEER_AMQP_URL": amqp_url, "BENCH_PEER_QUEUE": queue}
    if records is not None:
        env["BENCH_RECORDS"] = str(records)
    return env


def peer_server_process(*, amqp_url: str, queue: str, directory: Path) -> ServerProcess:
    """FastAPI under uvicorn, one process, as its users run it."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench.peer:app", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    return ServerProcess(
        "fastapi",
        argv,
        port=port,
        env=_peer_env(amqp_url, queue),
        log=directory / "fastapi.log",
    )


def celery_worker_process(
    *, amqp_url: str, queue: str, records: Path, directory: Path, pool: str, concurrency: int
) -> ServerProcess:
    """``celery worker`` running the same no-op task (acks_late)."""
    argv = [sys.executable, "-m", "celery", "-A", "bench.peer:celery", "worker", "-Q", queue]
    argv += ["--pool", pool, "--concurrency", str(concurrency), "--loglevel", "WARNING"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return ServerProcess(
        "celery-worker",
        argv,
        env=_peer_env(amqp_url, queue, records),
        log=directory / "celery-worker.log",
        ready_check=lambda: has_consumer(amqp_url, queue),
        # Cold shutdown: the queue is purged and the task does nothing; a warm one
        # takes 3-6 s here.
        stop_signal=signal.SIGQUIT,
    )


async def has_consumer(amqp_url: str, queue: str) -> bool:
    """Whether ``queue`` exists and has a consumer (a worker is ready)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        result = declared.declaration_result
        return bool(result.consumer_count)
    finally:
        await connection.close()


async def wait_for_consumer(amqp_url: str, queue: str, *, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if await has_consumer(amqp_url, queue):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"nobody consumes {queue} after {timeout_s:.0f} s")


async def purge_queues(amqp_url: str, names: Iterable[str]) -> int:
    """Drop what waits in these queues (a backlog a saturation phase left); how many."""
    purged = 0
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        for name in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
                ok = await queue.purge()
                purged += int(getattr(ok, "message_count", 0) or 0)
            except aio_pika.exceptions.ChannelClosed:
                channel = await connection.channel()
    finally:
        await connection.close()
    return purged


def bare_http_process(directory: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_http", "--port", str(port)]
    return ServerProcess(
        "bare-http", argv, port=port, env=dict(os.environ), log=directory / "bare-http.log"
    )


async def delete_queues(amqp_url: str, names: Iterable[str]) -> None:
    """Delete queues this run created (missing ones are fine); give up after a minute."""
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": "bench-cleanup"}, timeout=10
    )
    try:
        async with asyncio.timeout(60):
            channel = await connection.channel()
            for name in names:
                try:
                    await channel.queue_delete(name)
                except aio_pika.exceptions.ChannelClosed:
                    channel = await connection.channel()
    finally:
        await connection.close()


async def broker_version(amqp_url: str) -> str:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        underlay = connection.transport.connection if connection.transport else None
        properties = getattr(underlay, "server_properties", None) or {}
        version = properties.get("version", "unknown")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()
