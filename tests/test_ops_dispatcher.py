"""The dispatcher's metrics and status across a takeover, and the bound on queue labels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from broker.topology import declare_status_exchange
from observe import OTHER, ObserveSettings, QueueLabels
from schemas.status import DispatcherStatus, decode_status
from tests.conftest import DispatcherFactory, free_port
from tests.dispatcher_support import QueueKit
from tests.ops_support import scrape, value


@pytest.fixture
async def statuses(amqp: AbstractConnection) -> AsyncIterator[list[DispatcherStatus]]:
    """Every dispatcher status published while the test runs."""
    seen: list[DispatcherStatus] = []
    channel = await amqp.channel()
    exchange = await declare_status_exchange(channel)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen.append(decode_status(message.body))

    await queue.consume(on_message, no_ack=True)
    yield seen
    await channel.close()


async def _until(what: str, check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.1)


async def test_a_standby_that_takes_the_queue_over_counts_a_takeover(
    make_dispatcher: DispatcherFactory,
    queue_kit: QueueKit,
    statuses: list[DispatcherStatus],
    uid: str,
) -> None:
    await queue_kit.declare("q", limit=3)
    ports = [free_port(), free_port()]
    owner = await make_dispatcher(
        observe=ObserveSettings(metrics_port=ports[0]), dispatcher_status_interval_seconds=0.3
    )
    await make_dispatcher(  # the standby
        observe=ObserveSettings(metrics_port=ports[1]), dispatcher_status_interval_seconds=0.3
    )
    first = [await queue_kit.submit("q") for _ in range(4)]  # one over the limit of 3

    async def owned_and_standing_by() -> bool:
        a, b = await scrape(ports[0]), await scrape(ports[1])
        return (
            value(a, "polos_dispatcher_queues", state="owned") == 1
            and value(a, "polos_queue_holding", project=uid, queue="q") == 3
            and value(b, "polos_dispatcher_queues", state="standby") == 1
        )

    await _until("the first owns q, the second stands by", owned_and_standing_by)
    a = await scrape(ports[0])
    assert value(a, "polos_queue_concurrency_limit", project=uid, queue="q") == 3
    assert value(a, "polos_dispatcher_takeovers_total") == 0

    async def status_of_owner() -> bool:
        return any(
            s.queues and s.queues[0].queue_name == "q" and s.queues[0].holding == 3
            for s in statuses
        )

    await _until("the owner's status names q", status_of_owner)

    # Takeovers are sampled (each second, right before a status goes out): the standby
    # must have been seen standing by first.
    async def standby_sampled() -> bool:
        return any(s.standby == 1 for s in statuses)

    await _until("the standby's status says it stands by", standby_sampled)
    status = next(s for s in statuses if s.queues and s.queues[0].holding == 3)
    assert (status.queues[0].project_id, status.queues[0].limit) == (uid, 3)
    assert status.queues[0].waiting == 1, "the fourth waits in the owner's prefetch"
    assert status.queues[0].counts == {"admitted": 3}

    await owner.stop(drain=False)  # its submission goes back to the queue
    second = await queue_kit.submit("q")

    async def taken_over() -> bool:
        b = await scrape(ports[1])
        return value(b, "polos_dispatcher_takeovers_total") == 1

    await _until("the standby counts a takeover", taken_over)
    b = await scrape(ports[1])
    assert value(b, "polos_dispatcher_queues", state="owned") == 1
    assert value(b, "polos_dispatcher_queues", state="standby") == 0
    assert second not in first


@pytest.mark.parametrize(
    ("patterns", "cap", "seen", "expected"),
    [
        # the first `cap` matching pairs keep their names, for good
        ("*", 2, ["a/1", "a/2", "a/3", "a/1"], ["a/1", "a/2", OTHER, "a/1"]),
        ("acme/*", 10, ["acme/x", "beta/y"], ["acme/x", OTHER]),
        ("acme/*,beta/emails", 10, ["beta/emails", "beta/x"], ["beta/emails", OTHER]),
        ("*", 0, ["a/1"], [OTHER]),
    ],
)
def test_queue_labels_are_bounded(
    patterns: str, cap: int, seen: list[str], expected: list[str]
) -> None:
    labels = QueueLabels(ObserveSettings(metrics_queues=patterns, metrics_max_queues=cap))
    got = []
    for pair in seen:
        project, queue = pair.split("/")
        label = labels(project, queue)
        got.append(OTHER if label == (OTHER, OTHER) else "/".join(label))
    assert got == expected
