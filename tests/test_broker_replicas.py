"""POLOS_QUORUM_GROUP_SIZE: how many replicas our queues and the registry stream ask for.

RabbitMQ compares these arguments on every redeclare, so a queue declared by a
process configured otherwise (or before the setting existed) must still be
usable, as it is, by every process.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractConnection
from pydantic import SecretStr
from yarl import URL

from broker.registry import declare_registry
from broker.topology import declare_dead_letters, declare_work_queue
from schemas.topology import DEAD_LETTER_QUEUE, REGISTRY_STREAM, submit_queue
from tests.conftest import GatewayFactory, Tenant

GROUP_SIZE = "x-quorum-initial-group-size"


async def queue_arguments(amqp_url: str, name: str) -> str:
    """The arguments the broker keeps for queue ``name`` (rabbitmqctl's rendering)."""
    vhost = URL(amqp_url).path.lstrip("/") or "/"
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "arguments"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in listing.stdout.splitlines():
        queue, _, arguments = line.partition("\t")
        if queue == name:
            return arguments
    raise AssertionError(f"no queue {name} in {vhost}")


async def test_new_queues_ask_for_the_configured_replicas_and_old_ones_stay_usable(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Callable[[str, str, list[str]], Awaitable[None]],
    amqp: AbstractConnection,
    amqp_url: str,
    delete_queues: Callable[[str], None],
) -> None:
    # What the deployment had before it set a group size (or another process declared).
    await declare_dead_letters(amqp)
    await declare_registry(amqp)
    await register(tenant.project_id, "v1", ["hello"])
    delete_queues(submit_queue(tenant.project_id, "hello"))

    client = await make_gateway(amqp_url=SecretStr(amqp_url), quorum_group_size=1)
    response = await client.post(
        "/api/v1/workflows/hello/run", json={"payload": 1}, headers=tenant.headers
    )
    assert response.status == 200, await response.text()

    assert f'"{GROUP_SIZE}",1}}' in await queue_arguments(
        amqp_url, submit_queue(tenant.project_id, "hello")
    )
    # Declared before, without it: kept as they were, and the gateway still started.
    assert GROUP_SIZE not in await queue_arguments(amqp_url, DEAD_LETTER_QUEUE)
    assert "x-initial-cluster-size" not in await queue_arguments(amqp_url, REGISTRY_STREAM)


async def test_a_process_configured_otherwise_uses_the_queue_as_it_is(
    amqp: AbstractConnection, amqp_url: str, uid: str, delete_queues: Callable[[str], None]
) -> None:
    name = f"polos.work.{uid}.v1"
    delete_queues(name)
    await declare_work_queue(amqp, name, replicas=1)
    await declare_work_queue(amqp, name)  # would be PRECONDITION_FAILED on the channel
    await declare_work_queue(amqp, name, replicas=3)
    assert f'"{GROUP_SIZE}",1}}' in await queue_arguments(amqp_url, name)
