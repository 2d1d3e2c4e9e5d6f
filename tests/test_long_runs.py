"""G7: runs longer than the broker's consumer_timeout run once and hold one slot.

On a RabbitMQ node of the test's own with ``consumer_timeout = 60000`` (one
minute; RabbitMQ's default is 30), three executions on a queue with limit 2
and two workers: two run 150 s, the third waits those 150 s for a slot and then
runs. Nothing is held unacknowledged that long any more (DESIGN §3): the
dispatcher copies what it must keep into its ledger, the workers acknowledge
their work once they reported it running and keep it by heartbeats. So each
runs exactly once, never more than two at once, the records say what ran,
and no channel is closed for a late acknowledgement.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from recorder import Recorder
from schemas.dispatch import ExecutionStatus
from store import ExecutionStore
from tests.broker_nodes import RabbitNode
from tests.conftest import DispatcherFactory, NodeFactory
from tests.dispatcher_support import EventLog, Probe, QueueKit, probe_worker
from tests.store_support import recorder_settings, redis_client

S = ExecutionStatus
RUN_SECONDS = 150.0
CONSUMER_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.timeout(RUN_SECONDS * 2 + 120)


@pytest.fixture
async def node(rabbit_node: NodeFactory) -> RabbitNode:
    return await asyncio.to_thread(rabbit_node, consumer_timeout_ms=CONSUMER_TIMEOUT_MS)


async def test_runs_longer_than_consumer_timeout_run_once_within_the_limit(
    node: RabbitNode, uid: str, make_dispatcher: DispatcherFactory
) -> None:
    node_url = node.url
    connection = await aio_pika.connect(node_url)
    kit = QueueKit(connection, uid)
    events = EventLog(connection, uid)
    await kit.open()
    await events.open()
    probe = Probe()
    workers = [probe_worker(node_url, uid, probe, concurrency=2) for _ in range(2)]
    settings = recorder_settings(node_url, uid)
    recorder = Recorder(settings)
    async with redis_client(settings.redis_key_prefix) as redis:
        store = ExecutionStore(redis, key_prefix=settings.redis_key_prefix)
        try:
            await recorder.start()
            for worker in workers:
                await worker.start()
            await kit.declare("long", limit=2)
            dispatcher = await make_dispatcher(amqp_url=node_url)
            long_ones = [
                await kit.submit("long", {"seconds": RUN_SECONDS}, run_timeout=900)
                for _ in range(2)
            ]
            waiting = await kit.submit("long", {"seconds": 1}, run_timeout=900)
            ids = [*long_ones, waiting]

            ends = await events.wait_terminal(ids, timeout=RUN_SECONDS * 2 + 60)
            assert {ends[e].status for e in ids} == {S.COMPLETED}
            assert sorted(probe.runs) == sorted(ids)  # each ran exactly once
            assert probe.max_running == 2
            assert probe.cancelled == []
            # One dispatcher session all along: no channel closed under it.
            assert dispatcher.sessions == 1
            await asyncio.sleep(1.0)  # the recorder writes what it received
            for execution_id in ids:
                record = await store.get(uid, execution_id)
                assert record is not None
                assert record.status == "completed"
                assert record.started_at is not None
                assert record.completed_at is not None
                assert record.started_at <= record.completed_at
            waited = await store.get(uid, waiting)
            first = await store.get(uid, long_ones[0])
            assert waited is not None
            assert first is not None
            assert first.completed_at is not None
            assert waited.started_at is not None
            assert waited.started_at >= first.completed_at[:19]  # it waited for a slot
        finally:
            for worker in workers:
                await worker.stop(drain_timeout=0)
            await recorder.stop()
            await events.close()
            await kit.close()
            await connection.close()
    # The broker closed no channel for an acknowledgement held too long.
    log = node.log_file.read_text(errors="replace").lower()
    assert "consumer_timeout" not in log
    assert "delivery acknowledgement" not in log
