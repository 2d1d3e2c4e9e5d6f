"""broker.acks: a channel's acknowledgements written together, as the broker reads them.

The frames are checked byte for byte against pamqp's; what the broker does with
them (settled, requeued, nothing redelivered, nothing lost at a close) against
the real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from aiormq import spec
from aiormq.abc import ChannelFrame, DeliveredMessage

from broker.acks import (
    ACK,
    DROP,
    MAX_ABOVE,
    REQUEUE,
    Frame,
    Settled,
    ack_frame,
    acks_of,
    nack_frame,
    plan_round,
)

TAGS = (1, 2, 255, 256, 2**32 + 5, 2**63 - 1)


@pytest.mark.parametrize("channel", [1, 7, 65535])
@pytest.mark.parametrize("tag", TAGS)
def test_frames_are_pamqps(channel: int, tag: int) -> None:
    def pamqp(frame: spec.Basic.Ack | spec.Basic.Nack) -> bytes:
        return ChannelFrame.marshall(channel_number=channel, frames=[frame]).payload

    assert ack_frame(channel, tag) == pamqp(spec.Basic.Ack(delivery_tag=tag))
    assert ack_frame(channel, tag, multiple=True) == pamqp(
        spec.Basic.Ack(delivery_tag=tag, multiple=True)
    )
    for requeue in (True, False):
        expected = pamqp(spec.Basic.Nack(delivery_tag=tag, requeue=requeue))
        assert nack_frame(channel, tag, requeue=requeue) == expected


A, R, D = ACK, REQUEUE, DROP

# (settled before: floor, above), rounds of settlements made, the frames each round
# sends, (settled after: floor, above).
ROUNDS: list[
    tuple[
        str,
        tuple[int, set[int]],
        list[list[tuple[int, int]]],
        list[list[Frame]],
        tuple[int, set[int]],
    ]
] = [
    ("one ack goes alone", (0, set()), [[(1, A)]], [[(1, A, False)]], (1, set())),
    (
        "a run from the floor: one multiple at its top",
        (0, set()),
        [[(1, A), (2, A), (3, A)]],
        [[(3, A, True)]],
        (3, set()),
    ),
    (
        "made out of order: still one, at the highest",
        (0, set()),
        [[(3, A), (1, A), (2, A)]],
        [[(3, A, True)]],
        (3, set()),
    ),
    (
        "a held tag (2) stops it: below it one, above it one by one",
        (0, set()),
        [[(1, A), (3, A), (4, A)]],
        [[(1, A, False), (3, A, False), (4, A, False)]],
        (1, {3, 4}),
    ),
    (
        "the held tag settled: the next round covers everything up to its top",
        (1, {3, 4}),
        [[(2, A), (5, A)]],
        [[(5, A, True)]],
        (5, set()),
    ),
    (
        "two below the hole go as one, the rest one by one",
        (0, set()),
        [[(1, A), (2, A), (4, A), (6, A)]],
        [[(2, A, True), (4, A, False), (6, A, False)]],
        (2, {4, 6}),
    ),
    (
        "tags settled in earlier rounds are covered, never named",
        (4, set()),
        [[(7, A), (5, A), (6, A)], [(8, A)], [(10, A), (9, A)]],
        [[(7, A, True)], [(8, A, False)], [(10, A, True)]],
        (10, set()),
    ),
    (
        "a round with a nack goes as made (a multiple would ack the requeued)",
        (0, set()),
        [[(1, A), (2, R), (3, A), (4, D)]],
        [[(1, A, False), (2, R, False), (3, A, False), (4, D, False)]],
        (4, set()),
    ),
    (
        "nacked tags count as settled for the next round",
        (0, set()),
        [[(1, R)], [(2, A), (3, A)]],
        [[(1, R, False)], [(3, A, True)]],
        (3, set()),
    ),
    (
        "the floor is the last of the leading run, not the round's top",
        (0, {3}),
        [[(1, A), (2, A), (5, A)]],
        [[(2, A, True), (5, A, False)]],
        (3, {5}),
    ),
]


@pytest.mark.parametrize(
    ("before", "rounds", "sent", "after"),
    [case[1:] for case in ROUNDS],
    ids=[case[0] for case in ROUNDS],
)
def test_plan_round(
    before: tuple[int, set[int]],
    rounds: list[list[tuple[int, int]]],
    sent: list[list[Frame]],
    after: tuple[int, set[int]],
) -> None:
    settled = Settled(before[0], set(before[1]))
    assert [plan_round(settled, made) for made in rounds] == sent
    assert (settled.floor, settled.above) == after


def test_a_tag_held_for_good_ends_coalescing_on_its_channel() -> None:
    # Tag 1 is never settled (as a no-ack consumer's would never be): the settled
    # tags above it are kept up to MAX_ABOVE, then the channel goes one by one.
    settled = Settled()
    tag = 2
    while settled.coalescing:
        made = [(tag, A), (tag + 1, A)]
        assert plan_round(settled, made) == [(tag, A, False), (tag + 1, A, False)]
        tag += 2
    assert tag > MAX_ABOVE
    assert settled.above == set()
    assert plan_round(settled, [(1, A), (tag, A)]) == [(1, A, False), (tag, A, False)]


async def _fill(amqp: AbstractConnection, queue: str, count: int) -> None:
    channel = await amqp.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    for n in range(count):
        await channel.default_exchange.publish(aio_pika.Message(b"%d" % n), routing_key=queue)
    await channel.close()


async def _ready(amqp: AbstractConnection, queue: str, expected: int) -> int:
    """The queue's ready count once it is ``expected`` or after 3 s (a quorum queue takes
    back a closed channel's deliveries a moment after the close)."""
    channel = await amqp.channel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    while True:
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count or 0
        if count == expected or loop.time() > deadline:
            await channel.close()
            return count
        await asyncio.sleep(0.05)


class _Consumer:
    """A raw aiormq consumer that records the deliveries it gets."""

    def __init__(self, underlay: aiormq.abc.AbstractChannel) -> None:
        self.underlay = underlay
        self.deliveries: list[tuple[int, bool]] = []  # (tag, redelivered)
        self._arrived = asyncio.Event()

    async def start(self, queue: str, prefetch: int) -> None:
        await self.underlay.basic_qos(prefetch_count=prefetch)
        await self.underlay.basic_consume(queue, self._on_message)

    async def _on_message(self, message: DeliveredMessage) -> None:
        frame = message.delivery
        assert isinstance(frame, spec.Basic.Deliver)
        self.deliveries.append((frame.delivery_tag or 0, bool(frame.redelivered)))
        self._arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.deliveries) < count:
                self._arrived.clear()
                await self._arrived.wait()


async def test_acks_and_nacks_of_one_round_settle_every_delivery(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    delete_queues(uid)
    await _fill(amqp, uid, 50)
    channel = await amqp.channel()
    consumer = _Consumer(await channel.get_underlay_channel())
    await consumer.start(uid, 50)
    await consumer.wait_for(50)
    acks = acks_of(consumer.underlay)
    assert acks_of(consumer.underlay) is acks
    tags = [tag for tag, _ in consumer.deliveries]

    for tag in tags[:40]:
        acks.ack(tag)
    for tag in tags[40:]:
        acks.nack(tag, requeue=True)

    # The requeued ten come back (only they: the forty are settled) ...
    await consumer.wait_for(60)
    await asyncio.sleep(0.2)
    again = consumer.deliveries[50:]
    assert len(again) == 10
    assert all(redelivered for _, redelivered in again)
    # ... and acknowledged right before the close, none is handed back.
    for tag, _ in again:
        acks.ack(tag)
    await acks.flush()
    await channel.close()
    assert await _ready(amqp, uid, 0) == 0


async def test_acks_on_a_closed_channel_raise_and_leave_the_deliveries_queued(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    delete_queues(uid)
    await _fill(amqp, uid, 5)
    channel = await amqp.channel()
    consumer = _Consumer(await channel.get_underlay_channel())
    await consumer.start(uid, 5)
    await consumer.wait_for(5)
    await channel.close()

    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        acks_of(consumer.underlay).ack(consumer.deliveries[0][0])
    await acks_of(consumer.underlay).flush()

    assert await _ready(amqp, uid, 5) == 5


def _spy_settlements(underlay: aiormq.abc.AbstractChannel) -> list[tuple[int, bool]]:
    """(tag, multiple) of each ``basic.ack`` the channel writes from now on."""
    seen: list[tuple[int, bool]] = []
    queue = cast(aiormq.Channel, underlay).write_queue
    put_nowait, put = queue.put_nowait, queue.put

    def record(frame: ChannelFrame) -> None:
        payload = frame.payload
        while len(payload) >= 21 and payload[7:11] == b"\x00\x3c\x00\x50":
            tag = int.from_bytes(payload[11:19], "big")
            seen.append((tag, bool(payload[19] & 1)))
            payload = payload[21:]

    def spy_nowait(frame: ChannelFrame) -> None:
        record(frame)
        put_nowait(frame)

    async def spy(frame: ChannelFrame) -> None:
        record(frame)
        await put(frame)

    # An instance attribute shadows the method: this queue only.
    setattr(queue, "put_nowait", spy_nowait)  # noqa: B010
    setattr(queue, "put", spy)  # noqa: B010
    return seen


async def test_a_round_of_acks_is_one_frame_and_the_broker_settles_them_all(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    delete_queues(uid)
    await _fill(amqp, uid, 50)
    channel = await amqp.channel()
    consumer = _Consumer(await channel.get_underlay_channel())
    await consumer.start(uid, 50)
    await consumer.wait_for(50)
    sent = _spy_settlements(consumer.underlay)
    acks = acks_of(consumer.underlay)
    tags = [tag for tag, _ in consumer.deliveries]

    for tag in reversed(tags[:30]):
        acks.ack(tag)
    await acks.flush()
    for tag in tags[30:]:
        acks.ack(tag)
    await acks.flush()

    assert sent == [(tags[29], True), (tags[49], True)]
    await channel.close()
    assert await _ready(amqp, uid, 0) == 0


async def test_deliveries_held_below_coalesced_acks_stay_held(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    # Two deliveries held (as a submission waiting for a slot is) while the ones
    # around them are acknowledged: those are acknowledged one by one above the
    # first held, and the held two come back to the queue when the channel closes.
    delete_queues(uid)
    await _fill(amqp, uid, 20)
    channel = await amqp.channel()
    consumer = _Consumer(await channel.get_underlay_channel())
    await consumer.start(uid, 20)
    await consumer.wait_for(20)
    sent = _spy_settlements(consumer.underlay)
    acks = acks_of(consumer.underlay)
    tags = [tag for tag, _ in consumer.deliveries]
    held = {tags[5], tags[12]}

    for tag in tags:
        if tag not in held:
            acks.ack(tag)
    await acks.flush()

    assert sent[0] == (tags[4], True)
    assert sent[1:] == [(tag, False) for tag in tags[6:] if tag not in held]
    await asyncio.sleep(0.2)
    assert len(consumer.deliveries) == 20  # nothing settled came back
    await channel.close()
    assert await _ready(amqp, uid, 2) == 2
