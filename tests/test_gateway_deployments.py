"""Which deployment a submission goes to: the latest registered, or the one it names."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.context import APP_LINK
from schemas.envelope import decode_submission
from schemas.topology import submit_queue
from tests.conftest import GatewayFactory, Tenant, assert_error, take_messages

Client = TestClient[web.Request, web.Application]
Register = Callable[[str, str, list[str]], Awaitable[None]]


async def _until_seen(client: Client, seen: Callable[[Any], bool]) -> None:
    """Until the gateway's registry view (followed live from the stream) satisfies ``seen``."""
    assert client.app is not None
    state = client.app[APP_LINK].state
    async with asyncio.timeout(5):
        while not seen(state):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _deployment_of(
    client: Client, tenant: Tenant, workflow: str = "hello", **body: Any
) -> str:
    response = await client.post(
        f"/api/v1/workflows/{workflow}/run", json={"payload": 1, **body}, headers=tenant.headers
    )
    assert response.status == 200, await response.text()
    return str((await response.json())["execution_id"])


async def test_latest_registered_deployment_is_the_default_and_an_old_one_stays_old(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Register,
    amqp: AbstractConnection,
    delete_queues: Callable[[str], None],
) -> None:
    project = tenant.project_id
    for queue in ("hello", "extra"):
        delete_queues(submit_queue(project, queue))
    await register(project, "v1", ["hello"])
    client = await make_gateway()
    sent: list[tuple[str, str]] = []  # (execution id, deployment it must be stamped with)

    sent.append((await _deployment_of(client, tenant), "v1"))

    await register(project, "v2", ["hello"])
    await _until_seen(client, lambda state: state.latest.get(project) == "v2")
    sent.append((await _deployment_of(client, tenant), "v2"))
    sent.append((await _deployment_of(client, tenant, deployment_id="v1"), "v1"))

    # An old fleet restarting (re-registering v1, now with one more workflow)
    # adds its workflow but does not take the default back.
    await register(project, "v1", ["hello", "extra"])
    await _until_seen(client, lambda state: "extra" in state.deployments[(project, "v1")].workflows)
    sent.append((await _deployment_of(client, tenant), "v2"))
    response = await client.post(
        "/api/v1/workflows/extra/run", json={"payload": 1}, headers=tenant.headers
    )
    await assert_error(response, 404, "WORKFLOW_NOT_FOUND")  # v2 has no "extra"
    extra = await _deployment_of(client, tenant, "extra", deployment_id="v1")

    # A gateway started now replays the registry to the same view.
    restarted = await make_gateway()
    sent.append((await _deployment_of(restarted, tenant), "v2"))

    messages = await take_messages(amqp, submit_queue(project, "hello"), len(sent))
    stamped = {
        decode_submission(m.body).execution_id: decode_submission(m.body).deployment_id
        for m in messages
    }
    assert stamped == dict(sent)
    [message] = await take_messages(amqp, submit_queue(project, "extra"), 1)
    envelope = decode_submission(message.body)
    assert (envelope.execution_id, envelope.deployment_id) == (extra, "v1")
