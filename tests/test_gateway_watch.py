"""The event streams' shared Redis subscription: events of the watched executions, of
their own project only; a stream that starts while the last one's channel is being
unsubscribed still gets events; a lost Redis connection is subscribed again and every
stream told to read its record again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.watch import RESYNC, Item, Subscription, Watch
from schemas.dispatch import ExecutionStatus, LifecycleEvent, encode
from schemas.ids import now_rfc3339
from store.layout import events_channel
from tests.redis_proxy import RedisProxy, redis_proxy
from tests.store_support import redis_host_port, redis_url

pytestmark = pytest.mark.asyncio


def _event(project_id: str, execution_id: str, status: ExecutionStatus) -> bytes:
    return encode(
        LifecycleEvent(
            status=status,
            execution_id=execution_id,
            project_id=project_id,
            workflow_id="wf",
            deployment_id="v1",
            queue_name="q",
            at=now_rfc3339(),
        )
    )


@pytest_asyncio.fixture
async def watch(uid: str) -> AsyncIterator[Watch]:
    watching = Watch(redis_url(), key_prefix=f"test:{uid}:", timeout_seconds=2.0)
    yield watching
    await watching.close()


async def _publish(
    redis: aioredis.Redis, uid: str, project: str, execution_id: str, status: ExecutionStatus
) -> None:
    channel = events_channel(f"test:{uid}:", project, execution_id)
    await redis.publish(channel, _event(project, execution_id, status))


async def _next(subscription: Subscription, timeout: float = 5.0) -> Item:
    async with asyncio.timeout(timeout):
        return await subscription.inbox.get()


async def test_a_stream_gets_its_executions_events_and_not_another_projects(
    watch: Watch, redis: aioredis.Redis, uid: str
) -> None:
    execution_id = str(uuid.uuid4())
    mine = await watch.subscribe(f"p{uid}", execution_id, "key_test")
    # Same execution id, another project: another channel.
    await _publish(redis, uid, f"other{uid}", execution_id, ExecutionStatus.RUNNING)
    body = _event(f"p{uid}", execution_id, ExecutionStatus.ADMITTED)
    await redis.publish(events_channel(f"test:{uid}:", f"p{uid}", execution_id), body)
    item = await _next(mine)
    assert isinstance(item, tuple)
    event, raw = item
    assert (event.project_id, event.status) == (f"p{uid}", ExecutionStatus.ADMITTED)
    assert raw == body  # what the stream sends is what was published
    assert mine.inbox.empty()
    assert (watch.channels, watch.streams) == (1, 1)
    watch.unsubscribe(mine)
    assert watch.streams == 0


async def test_a_stream_joining_while_the_last_one_unsubscribes_gets_events(
    watch: Watch, redis: aioredis.Redis, uid: str
) -> None:
    project, execution_id = f"p{uid}", str(uuid.uuid4())
    first = await watch.subscribe(project, execution_id, "key_test")
    watch.unsubscribe(first)  # the last stream: its channel goes (in a task)
    second = await watch.subscribe(project, execution_id, "key_test")
    await asyncio.sleep(0.1)  # the unsubscribe task has run by now

    assert watch.channels == 1
    await _publish(redis, uid, project, execution_id, ExecutionStatus.QUEUED)
    item = await _next(second)
    assert isinstance(item, tuple)
    assert item[0].status == ExecutionStatus.QUEUED
    watch.unsubscribe(second)


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[RedisProxy]:
    async with redis_proxy(*redis_host_port()) as running:
        yield running


async def test_a_lost_connection_is_subscribed_again_and_streams_resync(
    proxy: RedisProxy, redis: aioredis.Redis, uid: str
) -> None:
    watch = Watch(proxy.url(), key_prefix=f"test:{uid}:", timeout_seconds=0.5)
    try:
        project, execution_id = f"p{uid}", str(uuid.uuid4())
        subscription = await watch.subscribe(project, execution_id, "key_test")

        proxy.cut()
        await asyncio.sleep(0.5)  # the listener notices and retries while refused
        with pytest.raises(Exception, match="cannot watch"):
            await watch.subscribe(
                project, str(uuid.uuid4()), "key_test"
            )  # Redis away: an error at once
        # Published while the stream could not hear it: the record has it, hence RESYNC.
        await _publish(redis, uid, project, execution_id, ExecutionStatus.RUNNING)
        proxy.restore()

        assert await _next(subscription) is RESYNC
        assert watch.reconnects >= 1
        await _publish(redis, uid, project, execution_id, ExecutionStatus.COMPLETED)
        item = await _next(subscription)
        assert isinstance(item, tuple)
        assert item[0].status == ExecutionStatus.COMPLETED
        assert watch.channels == 1
    finally:
        await watch.close()
