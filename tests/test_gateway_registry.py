"""Submissions record their queues in the registry stream, where dispatchers find their limits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryFollower, RegistryState, RegistryWriter
from schemas.envelope import decode_submission
from schemas.registry import QueueEvent, RegistryEvent
from schemas.topology import submit_queue
from tests.conftest import GatewayFactory, Tenant, take_messages

Client = TestClient[web.Request, web.Application]
Register = Callable[[str, str, list[str]], Awaitable[None]]


async def _queue_events(amqp_url: str, project_id: str) -> tuple[list[QueueEvent], RegistryState]:
    """Replay the whole stream into a fresh state: this project's queue events, and the state."""
    connection = await aio_pika.connect(amqp_url)
    try:
        publisher = ConfirmedPublisher(connection, confirm_timeout=5, channels=1)
        await publisher.start()
        state = RegistryState()
        follower = RegistryFollower(connection, RegistryWriter(publisher), state)
        events: list[QueueEvent] = []

        def collect(event: RegistryEvent) -> None:
            if isinstance(event, QueueEvent) and event.project_id == project_id:
                events.append(event)

        follower.add_listener(collect)
        await follower.start()
        await follower.replayed.wait()
        await follower.close()
        return events, state
    finally:
        await connection.close()


async def _submit(client: Client, tenant: Tenant, queue_name: str, limit: int | None) -> None:
    body: dict[str, object] = {"payload": 1, "queue_name": queue_name}
    if limit is not None:
        body["queue_concurrency_limit"] = limit
    response = await client.post("/api/v1/workflows/hello/run", json=body, headers=tenant.headers)
    assert response.status == 200, await response.text()


async def test_queue_declared_once_then_only_limit_changes_are_recorded(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    for queue in ("limited", "unlimited"):
        delete_queues(submit_queue(project, queue))
    await register(project, "v1", ["hello"])
    client = await make_gateway()

    await _submit(client, tenant, "limited", 3)  # first use: queue_declared, limit 3
    await _submit(client, tenant, "limited", 3)  # same limit: nothing
    await _submit(client, tenant, "limited", None)  # no limit given: nothing
    await _submit(client, tenant, "limited", 5)  # new limit: queue_limit_set 5
    await _submit(client, tenant, "limited", 5)  # same again: nothing
    await _submit(client, tenant, "unlimited", None)  # first use: queue_declared, no limit
    await _submit(client, tenant, "unlimited", None)
    # Another gateway (it replayed the registry) records only a real change.
    other = await make_gateway()
    await _submit(other, tenant, "limited", 5)
    await _submit(other, tenant, "unlimited", 2)

    events, state = await _queue_events(amqp_url, project)

    assert [(e.type, e.queue_name, getattr(e, "concurrency_limit", None)) for e in events] == [
        ("queue_declared", "limited", 3),
        ("queue_limit_set", "limited", 5),
        ("queue_declared", "unlimited", None),
        ("queue_limit_set", "unlimited", 2),
    ]
    # What a dispatcher starting now would apply.
    assert state.queues[(project, "limited")].concurrency_limit == 5
    assert state.queues[(project, "unlimited")].concurrency_limit == 2


async def test_a_burst_carrying_a_new_limit_records_it_once(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    delete_queues(submit_queue(project, "burst"))
    await register(project, "v1", ["hello"])
    client = await make_gateway()
    await _submit(client, tenant, "burst", 1)

    # Every SDK client of a fleet sends the (new) limit with each submission.
    await asyncio.gather(*(_submit(client, tenant, "burst", 8) for _ in range(50)))

    events, _ = await _queue_events(amqp_url, project)
    assert [(e.type, getattr(e, "concurrency_limit", None)) for e in events] == [
        ("queue_declared", 1),
        ("queue_limit_set", 8),
    ]


async def test_a_strategy_is_recorded_like_the_limit_and_the_latest_wins(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    for queue in ("keyed", "plain"):
        delete_queues(submit_queue(project, queue))
    await register(project, "v1", ["hello"])
    client = await make_gateway()

    async def submit(queue: str, **fields: object) -> None:
        body = {"payload": 1, "queue_name": queue, **fields}
        response = await client.post(
            "/api/v1/workflows/hello/run", json=body, headers=tenant.headers
        )
        assert response.status == 200, await response.text()

    await submit("keyed", concurrency_strategy="partition", queue_concurrency_limit=2)
    await submit("keyed", concurrency_strategy="partition")  # the same: nothing
    await submit("keyed")  # none given: nothing
    await submit("keyed", concurrency_strategy="cancel_in_progress", queue_concurrency_limit=3)
    await submit("plain")
    await submit("plain", concurrency_strategy="deduplicate")  # said out loud: recorded

    events, state = await _queue_events(amqp_url, project)
    assert [(e.type, e.queue_name, getattr(e, "concurrency_strategy", None)) for e in events] == [
        ("queue_declared", "keyed", "partition"),
        ("queue_limit_set", "keyed", None),
        ("queue_strategy_set", "keyed", "cancel_in_progress"),
        ("queue_declared", "plain", None),
        ("queue_strategy_set", "plain", "deduplicate"),
    ]
    keyed = state.queues[(project, "keyed")]
    assert (keyed.concurrency_limit, keyed.concurrency_strategy) == (3, "cancel_in_progress")
    assert state.queues[(project, "plain")].concurrency_strategy == "deduplicate"


async def test_the_operator_command_sets_a_strategy_and_a_limit_in_the_registry(
    tenant: Tenant, amqp_url: str, delete_queues: Callable[[str], None]
) -> None:
    project = tenant.project_id
    delete_queues(submit_queue(project, "ops"))
    env = {**os.environ, "POLOS_AMQP_URL": amqp_url}
    command = [sys.executable, "-m", "gateway", "queues", "set", "--project", project]
    done = await asyncio.to_thread(
        subprocess.run,
        [*command, "--queue", "ops", "--strategy", "partition", "--limit", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    refused = await asyncio.to_thread(
        subprocess.run,
        [*command, "--queue", "ops", "--strategy", "newest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "--strategy" in refused.stderr

    events, state = await _queue_events(amqp_url, project)
    assert [e.type for e in events] == ["queue_limit_set", "queue_strategy_set"]
    config = state.queues[(project, "ops")]
    assert (config.concurrency_limit, config.concurrency_strategy) == (4, "partition")


async def test_a_batch_item_carrying_a_strategy_sets_its_queues(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    delete_queues(submit_queue(project, "batched"))
    await register(project, "v1", ["hello"])
    client = await make_gateway()
    items = [
        {"workflow_id": "hello", "payload": 1, "queue_name": "batched"},
        {
            "workflow_id": "hello",
            "payload": 2,
            "queue_name": "batched",
            "concurrency_strategy": "cancel_in_progress",
        },
    ]
    response = await client.post(
        "/api/v1/workflows/batch_run", json={"workflows": items}, headers=tenant.headers
    )
    assert response.status == 200, await response.text()
    refused = await client.post(
        "/api/v1/workflows/batch_run",
        json={"workflows": [{**items[1], "concurrency_strategy": "latest"}]},
        headers=tenant.headers,
    )
    assert refused.status == 400
    assert "workflows.0.concurrency_strategy" in await refused.text()

    _, state = await _queue_events(amqp_url, project)
    assert state.queues[(project, "batched")].concurrency_strategy == "cancel_in_progress"


async def test_a_submission_carrying_a_limit_names_the_event_that_recorded_it(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp_url: str,
    amqp: AbstractConnection,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    name = submit_queue(project, "named")
    delete_queues(name)
    await register(project, "v1", ["hello"])
    client = await make_gateway()

    await _submit(client, tenant, "named", 3)  # queue_declared
    await _submit(client, tenant, "named", 5)  # queue_limit_set
    await _submit(client, tenant, "named", 5)  # nothing new: names the same event
    await _submit(client, tenant, "named", None)  # carries nothing: names nothing

    _, state = await _queue_events(amqp_url, project)
    declared, limited = state.queues[(project, "named")].event_ids
    envelopes = [decode_submission(m.body) for m in await take_messages(amqp, name, 4)]
    assert [e.queue_config_id for e in envelopes] == [declared, limited, limited, None]
