"""The record ends as what ran when a decision's acknowledgement is lost (DESIGN §3).

Under a broker kill -9 an owner decided ``deduplicated``, its event was stored,
and the submission's acknowledgement never reached the broker. The broker
delivers the submission again (a quorum queue counts it in ``x-delivery-count``),
the key is free by then, and it runs. The record must end ``completed``, not
keep the superseded ``deduplicated``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aio_pika
import pytest

from schemas.dispatch import ExecutionStatus, LifecycleEvent
from schemas.envelope import decode_submission
from schemas.ids import now_rfc3339
from schemas.topology import submit_queue
from tests.execution_support import running_system
from tests.store_support import publish_events

pytestmark = pytest.mark.asyncio


async def test_a_deduplicated_decision_whose_ack_was_lost_is_superseded_by_the_run(
    amqp_url: str, tmp_path: Path
) -> None:
    async with running_system(amqp_url, tmp_path, dispatcher=False) as system:
        execution_id = await system.submit("echo", payload={"n": 1}, concurrency_key="k")

        # Attempt 0, as an owner that is about to lose its connection: it takes
        # the submission, decides deduplicated and tells, but never acknowledges.
        channel = await system.amqp.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.declare_queue(submit_queue(system.project, "echo"), passive=True)
        delivered: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future()
        )

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not delivered.done():
                delivered.set_result(message)

        await queue.consume(take)
        message = await asyncio.wait_for(delivered, 10)
        assert not message.redelivered
        assert "x-delivery-count" not in (message.headers or {})
        envelope = decode_submission(message.body)
        deduplicated = LifecycleEvent(
            status=ExecutionStatus.DEDUPLICATED,
            execution_id=execution_id,
            project_id=system.project,
            workflow_id="echo",
            deployment_id=envelope.deployment_id,
            queue_name="echo",
            concurrency_key="k",
            at=now_rfc3339(),
            duplicate_of=str(uuid.uuid4()),
            submission=envelope,
        )
        await publish_events(system.amqp, [deduplicated])
        await system.wait_status(execution_id, "deduplicated")
        await channel.close()  # the acknowledgement is lost: the broker requeues it

        # Attempt 1: the next owner finds the key free, and it runs.
        await system.start_dispatcher()
        record = await system.wait_status(execution_id, "completed")

        assert record["duplicate_of"] is None
        assert record["result"]["echo"] == {"n": 1}
        assert record["admitted_at"] <= record["started_at"] <= record["completed_at"]
        # RabbitMQ counted the lost delivery, and the dispatcher reported under it.
        admitted = system.events.first(execution_id, ExecutionStatus.ADMITTED)
        assert admitted.attempt == 1
