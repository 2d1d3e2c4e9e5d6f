"""The event streams' shared queue: a stream that starts while the last one's binding
is being taken away still gets its execution's events."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import pytest

from broker.topology import declare_dispatch_exchanges
from gateway.watch import Watch
from schemas.dispatch import LifecycleEvent, encode_queued_event
from schemas.envelope import encode_submission
from schemas.ids import now_rfc3339
from schemas.topology import EVENTS_EXCHANGE, event_routing_key

pytestmark = pytest.mark.asyncio


def _queued(project_id: str, execution_id: str) -> bytes:
    at = now_rfc3339()
    common: dict[str, Any] = {
        "execution_id": execution_id,
        "created_at": at,
        "project_id": project_id,
        "workflow_id": "wf",
        "deployment_id": "v1",
        "queue_name": "q",
        "concurrency_key": None,
    }
    submission = encode_submission(
        **common,
        queue_concurrency_limit=None,
        run_timeout_seconds=60,
        payload=None,
        initial_state=None,
        session_id="s",
        user_id=None,
        otel_traceparent=None,
        parent_execution_id=None,
        root_execution_id=None,
        step_key=None,
        wait_for_subworkflow=False,
        submitted_by="k",
    )
    return encode_queued_event(**common, submission_raw=submission)


async def test_a_stream_joining_while_the_last_one_unbinds_gets_events(
    amqp_url: str, uid: str
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    watch = Watch()
    try:
        channel = await connection.channel()
        await declare_dispatch_exchanges(channel)
        project, execution_id = f"p{uid}", str(uuid.uuid4())

        first = await watch.subscribe(connection, project, execution_id, "key_test")
        watched = watch._watched[execution_id]
        watch.unsubscribe(first)  # the last stream: its binding goes
        async with asyncio.timeout(5):
            # Under the lock, the unbinding waits for the broker's answer.
            while not watched.lock.locked():  # noqa: ASYNC110
                await asyncio.sleep(0)
        second = await watch.subscribe(connection, project, execution_id, "key_test")

        assert watch.bindings == 1
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(_queued(project, execution_id)),
            event_routing_key(project, "q", "wf", execution_id),
        )
        async with asyncio.timeout(5):
            item = await second.inbox.get()
        assert isinstance(item, tuple)
        event, _raw = item
        assert isinstance(event, LifecycleEvent)
        assert (event.execution_id, event.status) == (execution_id, "queued")
        watch.unsubscribe(second)
    finally:
        await watch.close()
        await connection.close()
