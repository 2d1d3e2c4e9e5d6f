"""The batched publishes' confirmations (broker/confirms.py), against the real broker.

Each batched publish holds a light confirmation in aiormq's channel instead of a
future of aiormq's store; these check what that must keep: every publish is
settled by its own confirm and leaves nothing registered, and a channel the
broker closes fails every publish still waiting, at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker.confirms import Batch, Publish


def _publish(routing_key: str, n: int, *, exchange: str = "") -> Publish:
    return Publish(b'{"n": %d}' % n, exchange, routing_key, True, f"m-{n}", True, None)


def _store_size(underlay: Any) -> int:
    return len(underlay._Base__future_store.futures)  # aiormq's own store, name-mangled


async def _underlay(channel: AbstractChannel) -> Any:
    """aiormq's channel, whose ``confirmations`` the batches register in."""
    return await channel.get_underlay_channel()


async def _publish_all(batch: Batch, items: list[Publish]) -> list[Any]:
    """Each publish's outcome (None or its exception), in order; no confirm timeout, so
    a publish that nothing settles fails the test after 10 s."""
    publishes = (batch.publish(item, None) for item in items)
    return await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 10)


async def _quorum_queue(channel: AbstractChannel, name: str) -> None:
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def test_each_publish_is_settled_by_its_confirm_and_leaves_nothing_registered(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    queue = f"confirms-{uid}"
    delete_queues(queue)
    channel = await amqp.channel(publisher_confirms=True)
    await _quorum_queue(channel, queue)
    underlay = await _underlay(channel)
    before = _store_size(underlay)
    batch = Batch(channel)

    results = await asyncio.wait_for(
        asyncio.gather(*(batch.publish(_publish(queue, n), None) for n in range(300))), 15
    )

    assert results == [None] * 300
    assert len(underlay.confirmations) == 0
    assert underlay.message_id_delivery_tag == {}
    assert _store_size(underlay) == before
    declared = await channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count == 300
    await channel.close()


async def test_a_publish_the_broker_refuses_routing_is_unroutable_and_the_rest_confirmed(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    queue = f"confirms-{uid}"
    delete_queues(queue)
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    await _quorum_queue(channel, queue)
    batch = Batch(channel)
    items = [_publish(queue, n) for n in range(20)]
    items.insert(10, _publish(f"no-such-queue-{uid}", 99))  # mandatory: returned

    results = await _publish_all(batch, items)

    assert isinstance(results.pop(10), aiormq.exceptions.PublishError)
    assert results == [None] * 20
    underlay = await _underlay(channel)
    assert underlay.message_id_delivery_tag == {}
    await channel.close()


async def test_a_channel_the_broker_closes_fails_every_publish_still_waiting(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    queue = f"confirms-{uid}"
    delete_queues(queue)
    setup = await amqp.channel()
    await _quorum_queue(setup, queue)
    channel = await amqp.channel(publisher_confirms=True)
    batch = Batch(channel)
    # One write: the broker closes the channel at the publish to a missing exchange,
    # before the quorum queue commits what came before it, so those confirms never come.
    items = [_publish(queue, n) for n in range(200)]
    items.append(_publish(queue, 999, exchange=f"no-such-exchange-{uid}"))

    results = await _publish_all(batch, items)

    assert any(isinstance(r, BaseException) for r in results[:-1]), "no confirm was pending"
    assert all(r is None or isinstance(r, aiormq.exceptions.AMQPError) for r in results)
    assert isinstance(results[-1], aiormq.exceptions.AMQPError)
    await setup.close()
