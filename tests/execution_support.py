"""The whole system in one test process, for the execution API tests.

``running_system`` starts, for one project of its own: a recorder (its own queue
and Redis key prefix), a dispatcher owning the project's queues, a worker of
the deployment (workflows ``echo``, ``sleep``, ``fail``, ``flaky``) and a gateway whose
status endpoints read what that recorder writes. Started once per test module:
each start replays the registry stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.registry import register_deployment
from dispatcher import Dispatcher
from dispatcher import Settings as DispatcherSettings
from gateway.settings import Settings
from recorder import Recorder
from schemas.topology import results_queue, submit_queue, work_queue
from tests.conftest import Tenant, new_tenant, running_gateway
from tests.dispatcher_support import DEPLOYMENT, EventLog, Probe
from tests.store_support import recorder_settings, redis_url
from worker import ExecutionContext, Worker

Client = TestClient[web.Request, web.Application]


async def echo(ctx: ExecutionContext, payload: Any) -> Any:
    return {"echo": payload, "worker_id": ctx.worker_id}


async def fail(ctx: ExecutionContext, payload: Any) -> Any:
    raise ValueError(f"cannot handle {payload!r}")


async def flaky(ctx: ExecutionContext, payload: Any) -> Any:
    """Fails its first run, completes its retry."""
    if ctx.retry_count == 0:
        raise ConnectionError(f"run {ctx.retry_count + 1} lost its link")
    return {"retry_count": ctx.retry_count}


@dataclass
class System:
    amqp_url: str
    tenant: Tenant
    client: Client
    amqp: AbstractConnection
    probe: Probe
    events: EventLog
    settings: Settings
    dispatchers: list[Dispatcher] = field(default_factory=list)
    queues: set[str] = field(default_factory=set)

    @property
    def project(self) -> str:
        return self.tenant.project_id

    @property
    def headers(self) -> dict[str, str]:
        return self.tenant.headers

    async def submit(self, workflow: str = "echo", **body: Any) -> str:
        """Submit over HTTP (payload defaults to null); the execution id."""
        body.setdefault("payload", None)
        self.queues.add(body.get("queue_name") or workflow)
        response = await self.client.post(
            f"/api/v1/workflows/{workflow}/run", json=body, headers=self.headers
        )
        assert response.status == 200, await response.text()
        execution_id: str = (await response.json())["execution_id"]
        return execution_id

    async def get(self, execution_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/api/v1/executions/{execution_id}", headers=self.headers)
        assert response.status == 200, await response.text()
        record: dict[str, Any] = await response.json()
        return record

    async def wait_status(
        self, execution_id: str, *statuses: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll the status endpoint (as a client does) until one of ``statuses``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            response = await self.client.get(
                f"/api/v1/executions/{execution_id}", headers=self.headers
            )
            if response.status == 200:
                last = await response.json()
                if last["status"] in statuses:
                    record: dict[str, Any] = last
                    return record
            else:
                last = (response.status, await response.text())
            await asyncio.sleep(0.02)
        raise AssertionError(f"{execution_id} never became {statuses}; last: {last}")

    async def start_dispatcher(self, **overrides: Any) -> Dispatcher:
        fields: dict[str, Any] = {
            "amqp_url": self.amqp_url,
            "dispatcher_queues": f"{self.project}/*",
            **overrides,
        }
        dispatcher = Dispatcher(DispatcherSettings(**fields))
        self.dispatchers.append(dispatcher)
        await dispatcher.start()
        return dispatcher


@asynccontextmanager
async def running_system(
    amqp_url: str,
    directory: Path,
    *,
    dispatcher: bool = True,
    gateway: dict[str, Any] | None = None,
    redis: Callable[[], str] = redis_url,
) -> AsyncIterator[System]:
    tenant = new_tenant(directory / "projects.json")
    project = tenant.project_id
    await register_deployment(amqp_url, project, DEPLOYMENT, ["echo", "sleep", "fail", "flaky"])
    amqp = await aio_pika.connect(amqp_url)
    recorder = Recorder(recorder_settings(amqp_url, project, redis_url=redis()))
    await recorder.start()  # its queue is bound before anything is published
    probe = Probe()
    worker = Worker(project=project, deployment=DEPLOYMENT, concurrency=16, amqp_url=amqp_url)
    worker.add_workflow("echo", echo)
    worker.add_workflow("fail", fail, retries=0)  # its tests see the failure as the end
    worker.add_workflow("sleep", probe.sleep)
    worker.add_workflow("flaky", flaky, backoff=0.05)
    await worker.start()
    events = EventLog(amqp, project)
    await events.open()
    settings = Settings(
        amqp_url=amqp_url,
        projects_file=tenant.projects_file,
        confirm_timeout_seconds=3.0,
        redis_url=redis(),
        redis_key_prefix=f"test:{project}:",
        redis_timeout_seconds=0.5,
        **(gateway or {}),
    )
    queues: set[str] = set()
    try:
        async with running_gateway(settings) as client:
            system = System(amqp_url, tenant, client, amqp, probe, events, settings, queues=queues)
            if dispatcher:
                await system.start_dispatcher()
            try:
                yield system
            finally:
                for started in system.dispatchers:
                    await started.stop(drain=False)
    finally:
        await worker.stop(drain_timeout=0)
        await recorder.stop(timeout=1.0)
        await events.close()
        await _delete(amqp, project, queues)
        await _delete_keys(f"test:{project}:")
        await amqp.close()


async def _delete(amqp: AbstractConnection, project: str, queues: set[str]) -> None:
    names = [work_queue(project, DEPLOYMENT), f"polos.recorder.{project}"]
    for queue in queues:
        names += [submit_queue(project, queue), results_queue(project, queue)]
    for name in names:
        with contextlib.suppress(Exception):
            async with amqp.channel() as channel:
                await channel.queue_delete(name)


async def _delete_keys(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url())
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def sdk_client(system: System) -> Any:
    """The ``polos-sdk``'s client, pointed at the system's gateway as its tenant."""
    from polos.runtime.client import PolosClient

    return PolosClient(
        api_url=str(system.client.make_url("")).rstrip("/"),
        api_key=system.tenant.api_key,
        project_id=system.project,
    )
