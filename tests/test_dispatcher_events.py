"""The dispatcher's lifecycle events go out many to a message: one batch per project per
flush, each ``event()`` returning once its batch is confirmed, never raising."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from broker.errors import BrokerError
from broker.topology import declare_dispatch_exchanges
from dispatcher.notify import Notifier
from schemas.dispatch import ExecutionStatus
from tests.dispatcher_support import EventLog
from tests.store_support import Run

pytestmark = pytest.mark.asyncio

S = ExecutionStatus


async def _notifier(amqp_url: str, **options: float) -> tuple[AbstractConnection, Notifier]:
    connection = await aio_pika.connect(amqp_url)
    async with connection.channel() as channel:
        await declare_dispatch_exchanges(channel)
    notifier = Notifier(connection, confirm_timeout=5.0, channels=2, **options)  # type: ignore[arg-type]
    await notifier.start()
    return connection, notifier


async def test_events_of_one_round_share_one_message_per_project(
    amqp_url: str, amqp: AbstractConnection, uid: str
) -> None:
    mine, theirs = EventLog(amqp, uid), EventLog(amqp, f"{uid}b")
    await mine.open()
    await theirs.open()
    connection, notifier = await _notifier(amqp_url)
    try:
        runs = [Run(uid) for _ in range(40)]
        others = [Run(f"{uid}b") for _ in range(5)]
        await asyncio.gather(
            *(notifier.event(S.ADMITTED, r.submission(), with_submission=True) for r in runs),
            *(notifier.event(S.RUNNING, r.submission(), worker_id="w") for r in others),
        )
        # Returned after the confirms: the broker has routed them already.
        await mine.wait_for(lambda: len(mine.events) == 40, timeout=5, what="40 events")
        await theirs.wait_for(lambda: len(theirs.events) == 5, timeout=5, what="5 events")
        assert (mine.messages, theirs.messages) == (1, 1)
        assert notifier.batches_sent == 2
        assert {e.execution_id for e in mine.events} == {r.execution_id for r in runs}
        assert all(e.submission is not None for e in mine.events)
        assert {e.project_id for e in theirs.events} == {f"{uid}b"}
    finally:
        await notifier.close()
        await connection.close()
        await mine.close()
        await theirs.close()


async def test_a_batch_is_bounded_and_an_executions_events_keep_their_order(
    amqp_url: str, amqp: AbstractConnection, uid: str
) -> None:
    log = EventLog(amqp, uid)
    await log.open()
    connection, notifier = await _notifier(amqp_url, max_events=7, linger=0.005)
    try:
        runs = [Run(uid) for _ in range(10)]
        for status in (S.ADMITTED, S.RUNNING, S.COMPLETED):
            await asyncio.gather(*(notifier.event(status, r.submission()) for r in runs))
        await log.wait_for(lambda: len(log.events) == 30, timeout=5, what="30 events")
        # 10 events a round, at most 7 a message: two messages a round.
        assert log.messages == 6
        for run in runs:
            assert log.statuses(run.execution_id) == [S.ADMITTED, S.RUNNING, S.COMPLETED]
    finally:
        await notifier.close()
        await connection.close()
        await log.close()


async def test_an_event_that_cannot_be_published_raises_at_once(
    amqp_url: str,
) -> None:
    # The dispatcher lets go of nothing an event settles unless the broker took it.
    connection, notifier = await _notifier(amqp_url)
    await connection.close()
    started = time.monotonic()
    with pytest.raises(BrokerError):
        await notifier.event(S.ADMITTED, Run("p").submission())
    assert time.monotonic() - started < 1.0
    assert notifier.batches_sent == 0
    await notifier.close()
