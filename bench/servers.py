"""Servers under test, run as subprocesses, and the broker state they need.

The gateway runs exactly as a user runs it (``python -m gateway``, settings
from ``POLOS_*``), with a projects file and key of its own and a deployment
registered through the registry stream. Everything is named after one run id
so that runs never collide with each other or with tests, and every queue a
run creates is deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp

from broker.registry import register_deployment
from gateway.auth import create_key

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


class ServerProcess:
    """A server subprocess with a ``GET /ready`` that answers 200 once it can serve."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self._cwd = cwd
        self.port = port
        self._argv = list(argv)
        self._env = dict(env)
        self._log_path = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def start(self, *, ready_timeout_s: float = 30.0) -> None:
        self._process = self._spawn()
        url = f"http://127.0.0.1:{self.port}/ready"
        async with aiohttp.ClientSession() as session:
            try:
                async with asyncio.timeout(ready_timeout_s):
                    while True:
                        if self._process.poll() is not None:
                            raise RuntimeError(self._failure("exited during start"))
                        with contextlib.suppress(aiohttp.ClientError):
                            async with session.get(url) as response:
                                if response.status == 200:
                                    return
                        await asyncio.sleep(0.1)
            except TimeoutError:
                raise RuntimeError(self._failure("not ready in time")) from None

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
        tail = self._log_path.read_text(errors="replace")[-2000:]
        return f"{self.name} {what}; log {self._log_path}:\n{tail}"

    async def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=15)
        except TimeoutError:
            process.kill()
            await asyncio.to_thread(process.wait)


def gateway_process(
    index: int,
    *,
    amqp_url: str,
    tenant: Tenant,
    directory: Path,
    extra_env: Mapping[str, str],
    uvloop: bool,
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
    if uvloop:
        # An experiment, not how the gateway ships: same entry point on uvloop's loop.
        argv = [
            sys.executable,
            "-c",
            "import asyncio, sys, uvloop; "
            "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
            "from gateway.cli import main; sys.exit(main())",
        ]
    else:
        argv = [sys.executable, "-m", "gateway"]
    return ServerProcess(
        f"gateway[{index}]",
        argv,
        port=port,
        env=env,
        log=directory / f"gateway-{index}.log",
        cwd=tree,
    )


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
