"""G1 under broker loss, through a TCP proxy the test cuts (the shared broker is never stopped).

While the broker is unreachable the gateway answers 503 with ``Retry-After`` at
once, /ready says so, and it recovers by itself when the broker is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from gateway.app import create_app
from gateway.context import APP_LINK
from gateway.settings import Settings
from schemas.envelope import decode_submission
from schemas.topology import submit_queue
from tests.conftest import GatewayFactory, Tenant, assert_error, queue_depth, take_messages
from tests.proxy import TcpProxy

Client = TestClient[web.Request, web.Application]
Register = Callable[[str, str, list[str]], Awaitable[None]]
FAST = 1.0  # "503 quickly": well under a second, however long the outage


async def _submit(
    client: Client, tenant: Tenant, workflow: str = "hello", **body: Any
) -> tuple[ClientResponse, float]:
    started = time.monotonic()
    response = await client.post(
        f"/api/v1/workflows/{workflow}/run",
        json={"payload": {"n": 1}, **body},
        headers=tenant.headers,
    )
    await response.read()
    return response, time.monotonic() - started


async def _assert_503_fast(client: Client, tenant: Tenant, **body: Any) -> None:
    response, elapsed = await _submit(client, tenant, **body)
    error = await assert_error(response, 503, "BROKER_UNAVAILABLE")
    assert "amqp" not in error["error"].lower(), "broker internals leaked to the client"
    assert response.headers["Retry-After"] == "1"
    assert elapsed < FAST, f"503 took {elapsed:.2f}s"


async def _until_accepted(
    client: Client, tenant: Tenant, *, within: float, workflow: str = "hello", **body: Any
) -> str:
    """Submit until one is accepted (the gateway recovering on its own); its execution id."""
    async with asyncio.timeout(within):
        while True:
            response, _ = await _submit(client, tenant, workflow, **body)
            if response.status == 200:
                execution_id: str = (await response.json())["execution_id"]
                return execution_id
            assert response.status in (503, 404), await response.text()
            await asyncio.sleep(0.05)


async def _until_ready_is(client: Client, status: int, *, within: float) -> None:
    async with asyncio.timeout(within):
        while (await client.get("/ready")).status != status:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


ProxiedGateway = Callable[..., Awaitable[tuple[Client, str]]]


@pytest.fixture
def proxied_gateway(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    broker_proxy: TcpProxy,
    delete_queues: Callable[[str], None],
) -> ProxiedGateway:
    """``await proxied_gateway(*queues, **settings)``: the tenant's ``hello`` workflow
    registered, a gateway reaching the broker through ``broker_proxy`` (reconnecting
    every 0.2 s) and one submission it accepted (its execution id); ``hello``'s and
    ``queues``' submission queues are deleted at the end."""

    async def _start(*queues: str, **settings: Any) -> tuple[Client, str]:
        await register(tenant.project_id, "v1", ["hello"])
        client = await make_gateway(
            amqp_url=SecretStr(broker_proxy.url(amqp_url)),
            reconnect_interval_seconds=0.2,
            **settings,
        )
        for queue in ("hello", *queues):
            delete_queues(submit_queue(tenant.project_id, queue))
        response, _ = await _submit(client, tenant)
        assert response.status == 200
        execution_id: str = (await response.json())["execution_id"]
        return client, execution_id

    return _start


async def test_broker_loss_answers_503_fast_then_recovers_without_restart(
    proxied_gateway: ProxiedGateway,
    tenant: Tenant,
    register: Register,
    amqp: AbstractConnection,
    broker_proxy: TcpProxy,
) -> None:
    client, first = await proxied_gateway("new-during-outage", "later")
    hello = submit_queue(tenant.project_id, "hello")
    accepted = [first]

    broker_proxy.cut()
    # At once, and for as long as the outage lasts: an existing queue and one
    # that was never declared (its first declaration must not hang) both answer 503.
    await _assert_503_fast(client, tenant)
    await _assert_503_fast(client, tenant, queue_name="new-during-outage")
    await _until_ready_is(client, 503, within=2)
    outage_ends = time.monotonic() + 1.5
    while time.monotonic() < outage_ends:
        await _assert_503_fast(client, tenant)
        await _assert_503_fast(client, tenant, queue_name="new-during-outage")
        await asyncio.sleep(0.1)
    assert (await client.get("/health")).status == 200

    broker_proxy.restore()
    # Back within a few reconnect intervals (0.2 s here), not aio-pika's default 5 s.
    accepted.append(await _until_accepted(client, tenant, within=2.5))
    await _until_ready_is(client, 200, within=5)
    accepted.append(await _until_accepted(client, tenant, within=5, queue_name="new-during-outage"))

    # Nothing accepted was lost, nothing refused was stored.
    assert await queue_depth(amqp, hello) == 2
    messages = await take_messages(amqp, hello, 2)
    assert [decode_submission(m.body).execution_id for m in messages] == accepted[:2]
    # The registry is still followed after the reconnect: a deployment
    # registered now is resolved.
    await register(tenant.project_id, "v2", ["later"])
    await _until_accepted(client, tenant, within=5, workflow="later")


async def test_submissions_in_flight_when_the_broker_goes_answer_503_at_once(
    proxied_gateway: ProxiedGateway, tenant: Tenant, broker_proxy: TcpProxy
) -> None:
    client, _ = await proxied_gateway(confirm_timeout_seconds=10)

    broker_proxy.hold()  # published, but no confirm comes back
    in_flight = [asyncio.create_task(_submit(client, tenant)) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in in_flight)
    cut_at = time.monotonic()
    broker_proxy.cut()

    for response, _ in await asyncio.gather(*in_flight):
        await assert_error(response, 503, "BROKER_UNAVAILABLE")
        assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - cut_at < FAST


async def test_no_confirm_in_time_is_503(
    proxied_gateway: ProxiedGateway, tenant: Tenant, broker_proxy: TcpProxy
) -> None:
    client, _ = await proxied_gateway("first-use", confirm_timeout_seconds=0.5)

    broker_proxy.hold()
    # A queue already declared waits for its confirm; a queue used for the first
    # time waits for its declaration: both give up at the confirm timeout.
    for body in ({}, {"queue_name": "first-use"}):
        response, elapsed = await _submit(client, tenant, **body)
        await assert_error(response, 503, "BROKER_UNAVAILABLE")
        assert response.headers["Retry-After"] == "1"
        assert 0.5 <= elapsed < 0.5 + FAST, f"answered after {elapsed:.2f}s"

    broker_proxy.release()
    await _until_accepted(client, tenant, within=5, queue_name="first-use")


async def test_gateway_started_while_the_broker_is_unreachable_becomes_ready_when_it_returns(
    aiohttp_client: Any,
    gateway_settings: Settings,
    tenant: Tenant,
    register: Register,
    amqp: AbstractConnection,
    amqp_url: str,
    broker_proxy: TcpProxy,
    delete_queues: Callable[[str], None],
) -> None:
    await register(tenant.project_id, "v1", ["hello"])
    hello = submit_queue(tenant.project_id, "hello")
    delete_queues(hello)
    broker_proxy.cut()
    settings = gateway_settings.model_copy(
        update={
            "amqp_url": SecretStr(broker_proxy.url(amqp_url)),
            "reconnect_interval_seconds": 0.2,
        }
    )
    app = create_app(settings)
    client: Client = await aiohttp_client(app)

    assert (await client.get("/health")).status == 200
    ready = await client.get("/ready")
    assert ready.status == 503
    assert (await ready.json())["status"] == "not_ready"
    await _assert_503_fast(client, tenant)
    # Unknown deployments cannot be told apart yet: 503 (retry), not 404.
    await _assert_503_fast(client, tenant, deployment_id="v1")
    # Bad input needs no broker to be refused.
    bad = await client.post(
        "/api/v1/workflows/hello/run", json={"queue_name": "x"}, headers=tenant.headers
    )
    await assert_error(bad, 400, "VALIDATION_ERROR")

    broker_proxy.restore()
    async with asyncio.timeout(10):
        await app[APP_LINK].wait_ready()
    assert (await client.get("/ready")).status == 200
    response, _ = await _submit(client, tenant)
    assert response.status == 200
    assert await queue_depth(amqp, hello) == 1
