"""The owner reads a worker's ``Results`` batch as the reports it carries.

Each report is decided on its own (a completion, a failure, a release, a stale
one); the message is acknowledged only once every one of them is settled, which
``Deliveries`` keeps: a handle per report, the delivery handed back with the last.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aio_pika import Message
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from broker.topology import declare_work_queue
from dispatcher.consumers import Delivery
from dispatcher.effects import Deliveries
from schemas.dispatch import (
    Completed,
    ErrorInfo,
    ExecutionStatus,
    Failed,
    Released,
    WorkMessage,
    decode_work,
    encode,
    encode_results,
)
from schemas.ids import now_rfc3339
from schemas.topology import work_queue
from tests.conftest import DispatcherFactory
from tests.dispatcher_support import EventLog, QueueKit, until

S = ExecutionStatus


def delivery() -> Delivery:
    return cast(Delivery, object())


@pytest.mark.parametrize(
    ("shares", "order"),
    [
        (1, [0]),
        (3, [0, 1, 2]),
        (3, [2, 0, 1]),
        (4, [3, 3, 1, 0, 2]),  # a handle taken twice counts once
    ],
)
def test_a_shared_delivery_is_handed_back_with_its_last_handle(
    shares: int, order: list[int]
) -> None:
    deliveries = Deliveries()
    one, batch = delivery(), delivery()
    alone = deliveries.hold(one)
    refs = list(deliveries.hold_shared(batch, shares))
    assert len(set(refs)) == shares
    assert alone not in refs
    taken = [deliveries.take(refs[i]) for i in order]
    assert taken[:-1] == [None] * (len(order) - 1)
    assert taken[-1] is batch
    assert deliveries.take(alone) is one
    assert len(deliveries) == 0


class HandWorker:
    """Takes work and reports only when the test says, in one ``Results`` message."""

    def __init__(self, connection: AbstractConnection, work_queue: str) -> None:
        self.connection = connection
        self.work_queue = work_queue
        self.work: list[WorkMessage] = []
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        await declare_work_queue(self.connection, self.work_queue)
        channel = self._channel = await self.connection.channel()
        queue = await channel.declare_queue(self.work_queue, passive=True)
        await queue.consume(self._on_work)

    async def _on_work(self, message: AbstractIncomingMessage) -> None:
        self.work.append(decode_work(message.body))
        await message.ack()

    def of(self, execution_id: str) -> WorkMessage:
        return [w for w in self.work if w.submission.execution_id == execution_id][-1]

    async def report(self, *reports: Completed | Failed | Released) -> None:
        assert self._channel is not None
        body = encode_results([encode(r) for r in reports])
        await self._channel.default_exchange.publish(
            Message(body), routing_key=self.work[0].results_queue
        )


def done(work: WorkMessage, result: Any, *, dispatch_id: str | None = None) -> Completed:
    return Completed(
        execution_id=work.submission.execution_id,
        dispatch_id=dispatch_id or work.dispatch_id,
        worker_id="hand",
        at=now_rfc3339(),
        result=result,
    )


async def test_every_report_of_a_batch_is_decided_on_its_own(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    amqp: AbstractConnection,
) -> None:
    await queue_kit.declare("q", limit=3)
    hand = HandWorker(amqp, work_queue(queue_kit.project, queue_kit.deployment))
    await hand.start()
    await make_dispatcher()
    ok, bad, back, waiting = [await queue_kit.submit("q") for _ in range(4)]
    await until(lambda: len(hand.work) == 3, what="three dispatched")
    released_dispatch = hand.of(back).dispatch_id

    await hand.report(
        done(hand.of(ok), {"fine": True}),
        done(hand.of(ok), "a stale copy", dispatch_id="not-the-current-one"),
        Failed(
            execution_id=bad,
            dispatch_id=hand.of(bad).dispatch_id,
            worker_id="hand",
            at=now_rfc3339(),
            error=ErrorInfo(type="ValueError", message="no"),
        ),
        Released(
            execution_id=back,
            dispatch_id=released_dispatch,
            worker_id="hand",
            at=now_rfc3339(),
            reason="shutdown",
        ),
    )
    ended = await event_log.wait_terminal([ok, bad])
    assert ended[ok].status is S.COMPLETED
    assert ended[ok].result == {"fine": True}
    assert ended[bad].status is S.FAILED
    assert ended[bad].error is not None
    # The released one is dispatched again, and the freed slots admit the next.
    await until(
        lambda: (
            hand.of(back).dispatch_id != released_dispatch
            and any(w.submission.execution_id == waiting for w in hand.work)
        ),
        what="the released one again, and the waiting one",
    )
    await hand.report(done(hand.of(back), 1), done(hand.of(waiting), 2))
    ended = await event_log.wait_terminal([back, waiting])
    assert [ended[back].result, ended[waiting].result] == [1, 2]
    assert [ended[e].status for e in (back, waiting)] == [S.COMPLETED, S.COMPLETED]
    await asyncio.sleep(0.2)
    assert event_log.statuses(ok) == [S.ADMITTED, S.COMPLETED]
