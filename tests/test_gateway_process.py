"""``python -m gateway`` as an operator runs it: SIGTERM with requests in flight, SIGHUP reload."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aio_pika.abc import AbstractConnection

from gateway.auth import create_key, digest_key, key_id_for, revoke_key
from schemas.envelope import decode_submission
from schemas.topology import submit_queue
from tests.conftest import GatewayProcessFactory, Tenant, queue_depth, take_messages
from tests.proxy import TcpProxy

Register = Callable[[str, str, list[str]], Awaitable[None]]


@dataclass
class Outcomes:
    accepted: list[str] = field(default_factory=list)
    answered_after_signal: int = 0
    refused: int = 0  # a connection error: the request was never accepted
    wrong: list[str] = field(default_factory=list)


async def test_sigterm_finishes_requests_in_flight_and_loses_none(
    gateway_process: GatewayProcessFactory,
    tenant: Tenant,
    register: Register,
    amqp: AbstractConnection,
    amqp_url: str,
    broker_proxy: TcpProxy,
    delete_queues: Callable[[str], None],
) -> None:
    await register(tenant.project_id, "v1", ["hello"])
    queue = submit_queue(tenant.project_id, "hello")
    delete_queues(queue)
    gateway = await gateway_process(
        tenant.projects_file,
        POLOS_AMQP_URL=broker_proxy.url(amqp_url),
        POLOS_SHUTDOWN_TIMEOUT_SECONDS="20",
        POLOS_CONFIRM_TIMEOUT_SECONDS="10",
    )
    url = f"{gateway.url}/api/v1/workflows/hello/run"
    outcomes = Outcomes()
    signalled = asyncio.Event()
    enough_before_signal = asyncio.Event()

    async def client_loop(session: aiohttp.ClientSession) -> None:
        while True:
            sent_before_signal = not signalled.is_set()
            try:
                async with session.post(
                    url, json={"payload": {"n": 1}}, headers=tenant.headers
                ) as response:
                    text = await response.text()
                    if response.status != 200:
                        outcomes.wrong.append(f"{response.status}: {text}")
                        return
                    outcomes.accepted.append((await response.json())["execution_id"])
            except aiohttp.ClientConnectionError:
                if not signalled.is_set():
                    outcomes.wrong.append("connection error before SIGTERM")
                outcomes.refused += 1
                return
            except Exception as exc:  # a half-written answer, a body that is no JSON
                outcomes.wrong.append(repr(exc))
                return
            if sent_before_signal and signalled.is_set():
                outcomes.answered_after_signal += 1
            if len(outcomes.accepted) >= 150:
                enough_before_signal.set()

    finish_uploads = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"payload": {"uploaded": "'
        await finish_uploads.wait()
        yield b'slowly"}}'

    async def slow_upload(session: aiohttp.ClientSession) -> None:
        # Its body is still arriving at SIGTERM, when aiohttp stops reading: it
        # cannot be accepted any more, and must not hold the shutdown either.
        headers = {**tenant.headers, "Content-Type": "application/json"}
        try:
            async with session.post(url, data=slow_body(), headers=headers) as response:
                outcomes.wrong.append(f"slow upload answered {response.status}")
        except aiohttp.ClientConnectionError:
            outcomes.refused += 1

    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.create_task(client_loop(session)) for _ in range(40)]
        async with asyncio.timeout(20):
            await enough_before_signal.wait()
        uploads = [asyncio.create_task(slow_upload(session)) for _ in range(5)]
        # Hold the confirms so that every client has a submission waiting for
        # one when SIGTERM arrives; they come back only during the shutdown.
        broker_proxy.hold()
        await asyncio.sleep(0.3)
        gateway.send(signal.SIGTERM)
        signalled.set()
        await asyncio.sleep(0.5)
        broker_proxy.release()
        async with asyncio.timeout(5):
            await asyncio.gather(*clients, *uploads)
        finish_uploads.set()

    # Well within the shutdown timeout (20 s): nothing waits for a body that
    # will not be read.
    assert await gateway.wait_exit(within=5) == 0, gateway.log()
    assert outcomes.wrong == []
    # Every submission in flight at SIGTERM got its confirm and its 200.
    assert outcomes.answered_after_signal == 40
    # Then each client found the gateway gone; the uploads were refused.
    assert outcomes.refused == 40 + 5
    # Every 200 is in the queue, and nothing else is: none lost, none half-answered.
    assert await queue_depth(amqp, queue) == len(outcomes.accepted)
    messages = await take_messages(amqp, queue, len(outcomes.accepted))
    assert sorted(decode_submission(m.body).execution_id for m in messages) == sorted(
        outcomes.accepted
    )


async def _auth_status(session: aiohttp.ClientSession, url: str, tenant: Tenant, key: str) -> int:
    # An invalid body: 400 once authenticated, 401 before; nothing is published.
    headers = {"Authorization": f"Bearer {key}", "X-Project-ID": tenant.project_id}
    async with session.post(url, json={}, headers=headers) as response:
        return response.status


async def _until_status(
    session: aiohttp.ClientSession, url: str, tenant: Tenant, key: str, status: int
) -> None:
    async with asyncio.timeout(5):
        while await _auth_status(session, url, tenant, key) != status:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_sighup_reloads_the_projects_file(
    gateway_process: GatewayProcessFactory, tenant: Tenant, register: Register
) -> None:
    await register(tenant.project_id, "v1", ["hello"])
    gateway = await gateway_process(tenant.projects_file)
    url = f"{gateway.url}/api/v1/workflows/hello/run"
    new_key, _ = create_key(tenant.projects_file, tenant.project_id)

    async with aiohttp.ClientSession() as session:
        assert await _auth_status(session, url, tenant, tenant.api_key) == 400
        assert await _auth_status(session, url, tenant, new_key) == 401  # not read yet

        gateway.send(signal.SIGHUP)
        await _until_status(session, url, tenant, new_key, 400)

        assert revoke_key(tenant.projects_file, key_id_for(digest_key(tenant.api_key)))
        gateway.send(signal.SIGHUP)
        await _until_status(session, url, tenant, tenant.api_key, 401)
        assert await _auth_status(session, url, tenant, new_key) == 400

        # A file that no longer parses keeps the keys loaded before.
        tenant.projects_file.write_text("{not json")
        gateway.send(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await _auth_status(session, url, tenant, new_key) == 400
    assert gateway.process.returncode is None


async def test_sigterm_exits_even_when_the_broker_stopped_answering(
    gateway_process: GatewayProcessFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    broker_proxy: TcpProxy,
) -> None:
    await register(tenant.project_id, "v1", ["hello"])
    gateway = await gateway_process(tenant.projects_file, POLOS_AMQP_URL=broker_proxy.url(amqp_url))
    broker_proxy.hold()  # the TCP connection stays open; nothing comes back

    gateway.send(signal.SIGTERM)

    assert await gateway.wait_exit(within=10) == 0, gateway.log()
