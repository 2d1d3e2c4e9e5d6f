"""The broker away from the recorder: events wait in its queue, recording resumes by itself."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection

from store import ExecutionStore
from tests.conftest import has_depth
from tests.proxy import TcpProxy
from tests.redis_proxy import redis_proxy
from tests.store_support import (
    RecorderFactory,
    Run,
    all_completed,
    eventually,
    publish_events,
    redis_host_port,
)


async def test_events_published_while_the_recorder_lost_the_broker_are_recorded(
    make_recorder: RecorderFactory,
    broker_proxy: TcpProxy,
    amqp_url: str,
    amqp: AbstractConnection,
    store: ExecutionStore,
    uid: str,
) -> None:
    recorder = await make_recorder(
        amqp_url=broker_proxy.url(amqp_url), reconnect_interval_seconds=0.2
    )
    before = [Run(uid) for _ in range(5)]
    await publish_events(amqp, [e for run in before for e in run.lifecycle()])

    await eventually(lambda: all_completed(store, before), what="records while connected")

    broker_proxy.cut()
    during = [Run(uid) for _ in range(20)]
    # Published by the dispatchers' own connections, which still reach the broker.
    await publish_events(amqp, [e for run in during for e in run.lifecycle()])

    await eventually(
        lambda: has_depth(amqp, recorder.settings.recorder_queue, 6),  # ten a message
        what="events to wait in the queue",
    )
    broker_proxy.restore()

    await eventually(
        lambda: all_completed(store, during), timeout=15, what="recording to resume after the loss"
    )
    assert broker_proxy.accepted >= 2, "the recorder never lost its connection"

    await eventually(
        lambda: has_depth(amqp, recorder.settings.recorder_queue, 0), what="the queue to drain"
    )


async def test_a_batch_held_across_a_broker_loss_does_not_stop_the_recorder(
    make_recorder: RecorderFactory,
    broker_proxy: TcpProxy,
    amqp_url: str,
    amqp: AbstractConnection,
    store: ExecutionStore,
    uid: str,
) -> None:
    """Issue 9 item 4: the batch in hand when the broker went away came on a channel
    that is closed by the time it can be acknowledged; the recorder used to exit there."""
    async with redis_proxy(*redis_host_port()) as redis:
        recorder = await make_recorder(
            amqp_url=broker_proxy.url(amqp_url),
            redis_url=redis.url(),
            reconnect_interval_seconds=0.2,
        )
        redis.cut()
        held = [Run(uid) for _ in range(10)]
        await publish_events(amqp, [e for run in held for e in run.lifecycle()])
        await eventually(lambda: recorder.stats.write_failures > 0, what="a batch to be held")

        broker_proxy.cut()  # the held deliveries' channel dies with the connection
        await asyncio.sleep(0.3)
        broker_proxy.restore()
        redis.restore()  # the held batch is written, then acknowledged on a dead channel

        await eventually(
            lambda: all_completed(store, held), timeout=15, what="the held batch to be recorded"
        )
        after = [Run(uid) for _ in range(10)]
        await publish_events(amqp, [e for run in after for e in run.lifecycle()])

        await eventually(
            lambda: all_completed(store, after), timeout=15, what="recording after the loss"
        )
        assert recorder.running, "the recorder's batch loop ended"

        await eventually(
            lambda: has_depth(amqp, recorder.settings.recorder_queue, 0),
            timeout=15,
            what="the redelivered events to be settled",
        )
        await eventually(lambda: recorder.pending == 0, what="nothing left unsettled")
