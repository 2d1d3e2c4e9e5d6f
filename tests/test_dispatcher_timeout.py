"""Run timeouts: the clock starts at admission; at the deadline the execution ends
``timed_out`` (within a second), its worker is told to cancel, and the slot frees."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime

from aio_pika import Message
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from broker.topology import declare_work_queue
from schemas.dispatch import (
    CancelMessage,
    Completed,
    ExecutionStatus,
    Running,
    decode_cancel,
    decode_work,
    encode,
)
from schemas.ids import now_rfc3339
from schemas.topology import CANCEL_EXCHANGE, work_queue
from tests.conftest import DispatcherFactory, ProbeFactory
from tests.dispatcher_support import EventLog, QueueKit

S = ExecutionStatus


def _seconds(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_timed_out_execution_ends_within_a_second_and_its_task_is_cancelled(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
) -> None:
    await queue_kit.declare("q", limit=1)
    probe = await start_probe()
    await make_dispatcher()
    slow = await queue_kit.submit("q", {"seconds": 30}, run_timeout=1)
    nxt = await queue_kit.submit("q", {"seconds": 0.05})

    timed_out = await event_log.wait_status(slow, S.TIMED_OUT, timeout=5)
    # Events say when the owner decided: admitted, then timed out a second later.
    admitted = event_log.first(slow, S.ADMITTED)
    took = _seconds(timed_out.at) - _seconds(admitted.at)
    assert 1.0 <= took <= 2.0
    assert event_log.arrival(slow, S.TIMED_OUT) - event_log.arrival(slow, S.ADMITTED) <= 2.0
    assert timed_out.error is not None
    assert (await event_log.wait_terminal([nxt]))[nxt].status is S.COMPLETED
    await event_log.wait_for(lambda: slow in probe.cancelled, what="the task cancelled")
    assert not probe.running
    # A late report from the worker changes nothing.
    await asyncio.sleep(0.3)
    assert event_log.statuses(slow) == [S.ADMITTED, S.RUNNING, S.TIMED_OUT]


class StuckWorker:
    """Takes work, says it runs, never finishes, and writes down the cancels it gets."""

    def __init__(self, connection: AbstractConnection, work_queue: str) -> None:
        self.connection = connection
        self.work_queue = work_queue
        self.cancels: list[CancelMessage] = []
        self.taken: list[str] = []
        self._results_queue = ""
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        await declare_work_queue(self.connection, self.work_queue)
        channel = self._channel = await self.connection.channel()
        cancels = await channel.declare_queue(exclusive=True, auto_delete=True)
        await cancels.bind(CANCEL_EXCHANGE, routing_key=self.work_queue)
        await cancels.consume(self._on_cancel, no_ack=True)
        work = await channel.declare_queue(self.work_queue, passive=True)
        await work.consume(self._on_work)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        self.cancels.append(decode_cancel(message.body))

    async def _on_work(self, message: AbstractIncomingMessage) -> None:
        work = decode_work(message.body)
        self.taken.append(work.submission.execution_id)
        running = Running(
            execution_id=work.submission.execution_id,
            dispatch_id=work.dispatch_id,
            worker_id="stuck",
            at=now_rfc3339(),
        )
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            Message(encode(running)), routing_key=work.results_queue
        )
        self._results_queue = work.results_queue

    async def complete_late(self, execution_id: str) -> None:
        late = Completed(
            execution_id=execution_id,
            dispatch_id=uuid.uuid4().hex,
            worker_id="stuck",
            at=now_rfc3339(),
            result="too late",
        )
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            Message(encode(late)), routing_key=self._results_queue
        )


async def test_at_the_deadline_a_cancel_goes_to_the_deployments_workers(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    amqp: AbstractConnection,
) -> None:
    # A worker that ignores its deadline: only the dispatcher's cancel stops it.
    await queue_kit.declare("q", limit=1)
    stuck = StuckWorker(amqp, work_queue(queue_kit.project, queue_kit.deployment))
    await stuck.start()
    await make_dispatcher()
    first = await queue_kit.submit("q", run_timeout=1)
    second = await queue_kit.submit("q", run_timeout=1)

    started = time.monotonic()
    await event_log.wait_status(first, S.TIMED_OUT, timeout=5)
    await event_log.wait_for(lambda: len(stuck.cancels) >= 1, what="a cancel")
    assert stuck.cancels[0].execution_id == first
    assert stuck.cancels[0].reason == "timeout"
    # The freed slot goes to the next one, which times out the same way.
    await event_log.wait_status(second, S.TIMED_OUT, timeout=5)
    assert time.monotonic() - started < 4
    assert stuck.taken == [first, second]
    await event_log.wait_for(lambda: len(stuck.cancels) >= 2, what="a second cancel")

    # A result after the timeout is acknowledged and ignored.
    await stuck.complete_late(first)
    await asyncio.sleep(0.3)
    assert event_log.statuses(first) == [S.ADMITTED, S.RUNNING, S.TIMED_OUT]
