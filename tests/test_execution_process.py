"""``python -m gateway`` with event streams open: SIGTERM ends them at once, so the
process exits without waiting out its shutdown timeout."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from store import ExecutionStore
from tests.conftest import GatewayProcessFactory, Tenant
from tests.store_support import Run, redis_client, redis_url


@pytest.fixture
async def redis(tenant: Tenant) -> AsyncIterator[aioredis.Redis]:
    async with redis_client(f"test:{tenant.project_id}:") as client:
        yield client


async def test_sigterm_ends_open_event_streams_and_the_process_exits_soon(
    gateway_process: GatewayProcessFactory, tenant: Tenant, redis: aioredis.Redis
) -> None:
    prefix = f"test:{tenant.project_id}:"
    run = Run(tenant.project_id, "hello")
    await ExecutionStore(redis, 3600, key_prefix=prefix).record([run.admitted()])
    gateway = await gateway_process(
        tenant.projects_file,
        POLOS_REDIS_URL=redis_url(),
        POLOS_REDIS_KEY_PREFIX=prefix,
        POLOS_SHUTDOWN_TIMEOUT_SECONDS="30",
    )
    url = f"{gateway.url}/api/v1/executions/{run.execution_id}/events"

    async with aiohttp.ClientSession() as session:
        responses = [await session.get(url, headers=tenant.headers) for _ in range(3)]
        for response in responses:
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert b"event: record" in first
        started = time.monotonic()
        gateway.send(signal.SIGTERM)
        for response in responses:
            async with asyncio.timeout(5):
                rest = await response.content.read()  # the server closes the stream
            assert b"event: lifecycle" not in rest
            response.release()
    assert await gateway.wait_exit(within=10) == 0
    assert time.monotonic() - started < 10, "held until the shutdown timeout"
