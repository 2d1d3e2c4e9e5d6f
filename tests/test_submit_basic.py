"""Submitting: the happy path, confirmed into the durable queue with every stamped field."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractConnection

from schemas.envelope import decode_submission
from schemas.topology import submit_queue
from tests.conftest import GatewayFactory, Tenant, take_messages


async def test_accepted_submission_is_in_the_queue_with_stamped_fields(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    register: Callable[[str, str, list[str]], Awaitable[None]],
    amqp: AbstractConnection,
    delete_queues: Callable[[str], None],
) -> None:
    await register(tenant.project_id, "v1", ["hello"])
    client = await make_gateway()
    queue_name = submit_queue(tenant.project_id, "hello")
    delete_queues(queue_name)

    response = await client.post(
        "/api/v1/workflows/hello/run",
        json={"payload": {"n": 1}, "concurrency_key": "k1", "user_id": "u1"},
        headers=tenant.headers,
    )

    assert response.status == 200
    body = await response.json()
    execution_id = uuid.UUID(body["execution_id"])
    assert execution_id.version == 7
    [message] = await take_messages(amqp, queue_name, 1)
    assert message.delivery_mode == 2
    envelope = decode_submission(message.body)
    assert envelope.execution_id == body["execution_id"]
    assert envelope.created_at == body["created_at"]
    assert envelope.project_id == tenant.project_id
    assert envelope.workflow_id == "hello"
    assert envelope.deployment_id == "v1"
    assert envelope.queue_name == "hello"
    assert envelope.run_timeout_seconds == 3600
    assert envelope.payload == {"n": 1}
    assert envelope.concurrency_key == "k1"
    assert envelope.user_id == "u1"
    assert envelope.session_id
    assert envelope.submitted_by.startswith("key_")
