"""Redis away: events wait unacknowledged, nothing is lost, recording resumes by itself.

The recorder reaches Redis through a proxy the test cuts and restores; the
shared Redis itself is never stopped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractConnection

from store import ExecutionStore
from tests.conftest import queue_depth
from tests.redis_proxy import RedisProxy, redis_proxy
from tests.store_support import (
    RecorderFactory,
    Run,
    all_completed,
    count_completed,
    eventually,
    publish_events,
    redis_host_port,
)


@pytest.fixture
async def proxy() -> AsyncIterator[RedisProxy]:
    async with redis_proxy(*redis_host_port()) as running:
        yield running


async def test_events_wait_while_redis_is_down_and_are_recorded_when_it_returns(
    make_recorder: RecorderFactory,
    proxy: RedisProxy,
    amqp: AbstractConnection,
    store: ExecutionStore,
    uid: str,
) -> None:
    recorder = await make_recorder(redis_url=proxy.url())
    before = [Run(uid) for _ in range(5)]
    await publish_events(amqp, [e for run in before for e in run.lifecycle()])

    await eventually(lambda: all_completed(store, before), what="records while Redis is up")

    proxy.cut()
    acked = recorder.stats.acked
    during = [Run(uid) for _ in range(30)]
    await publish_events(amqp, [e for run in during for e in run.lifecycle()])

    async def all_received_and_failing() -> bool:
        # 90 events, ten to a message.
        return recorder.pending == 9 and recorder.stats.write_failures >= 3

    await eventually(all_received_and_failing, what="the recorder to hold every event")
    assert not recorder.store_available
    assert recorder.stats.acked == acked, "acknowledged events it could not write"
    assert await count_completed(store, during) == 0

    proxy.restore()

    await eventually(lambda: all_completed(store, during), what="the held events to be recorded")
    await eventually(lambda: recorder.pending == 0, what="acks after the writes")
    assert recorder.stats.acked == acked + 9
    assert recorder.store_available
    assert await all_completed(store, before)


async def test_a_recorder_stopped_while_redis_is_down_hands_every_event_back(
    make_recorder: RecorderFactory,
    proxy: RedisProxy,
    amqp: AbstractConnection,
    store: ExecutionStore,
    uid: str,
) -> None:
    cut_off = await make_recorder(redis_url=proxy.url())
    proxy.cut()
    runs = [Run(uid) for _ in range(20)]
    await publish_events(amqp, [e for run in runs for e in run.lifecycle()])
    await eventually(lambda: cut_off.pending == 6, what="events held")  # 60, ten a message

    await cut_off.stop(timeout=0.3)  # Redis still away: it gives up and closes
    assert cut_off.stats.acked == 0
    queue = cut_off.settings.recorder_queue

    async def handed_back() -> bool:
        return await queue_depth(amqp, queue) == 6  # messages of ten events

    # A quorum queue returns a closed channel's deliveries through its Raft log: soon, not at once.
    await eventually(handed_back, what="the unwritten events to go back to the queue")

    # Another recorder, with Redis, records them all.
    await make_recorder()

    await eventually(
        lambda: all_completed(store, runs), what="the handed-back events to be recorded"
    )
