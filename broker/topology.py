"""Declaring what every process relies on: idempotent, safe to run at each start."""

from __future__ import annotations

import logging
from typing import Any

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from broker.errors import BrokerUnavailable
from schemas.status import STATUS_EXCHANGE
from schemas.topology import (
    CANCEL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    EVENTS_EXCHANGE,
    RECORDER_BINDING_KEY,
    RECORDER_QUEUE,
    RECORDER_QUEUE_ARGUMENTS,
    RESULTS_QUEUE_ARGUMENTS,
    WORK_QUEUE_ARGUMENTS,
    replicated,
)

log = logging.getLogger(__name__)


async def declare_dead_letters(
    connection: AbstractConnection, *, replicas: int | None = None
) -> None:
    """The exchange every queue dead-letters to, and the queue that keeps what it gets."""
    await declare_queue(
        connection, DEAD_LETTER_QUEUE, replicated(DEAD_LETTER_QUEUE_ARGUMENTS, replicas)
    )
    try:
        async with connection.channel() as channel:
            exchange = await channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, ExchangeType.FANOUT, durable=True
            )
            queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
            await queue.bind(exchange)
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot declare the dead letters: {exc!r}") from exc


async def declare_queue(
    connection: AbstractConnection, name: str, arguments: dict[str, Any]
) -> None:
    """Declare a durable queue on a short-lived channel.

    A queue that already exists with other arguments (declared by a process
    configured differently, e.g. another ``max_length`` or replica count) is
    used as it is: the broker refuses the redeclare and closes the channel, so
    we check it exists with a passive declare on a fresh one.
    """
    try:
        try:
            async with connection.channel() as channel:
                await channel.declare_queue(name, durable=True, arguments=arguments)
            return
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning("queue %s exists with other arguments; using it as it is: %s", name, exc)
        async with connection.channel() as channel:
            await channel.declare_queue(name, passive=True)
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot declare {name!r}: {exc!r}") from exc


async def declare_work_queue(
    connection: AbstractConnection, name: str, *, replicas: int | None = None
) -> None:
    await declare_queue(connection, name, replicated(WORK_QUEUE_ARGUMENTS, replicas))


async def declare_dispatch_exchanges(channel: AbstractChannel) -> None:
    """The cancel (direct) and lifecycle events (topic) exchanges."""
    await channel.declare_exchange(CANCEL_EXCHANGE, ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True)


async def declare_results_queue(
    connection: AbstractConnection, name: str, *, replicas: int | None = None
) -> None:
    await declare_queue(connection, name, replicated(RESULTS_QUEUE_ARGUMENTS, replicas))


async def declare_recorder_queue(
    connection: AbstractConnection,
    name: str = RECORDER_QUEUE,
    binding_key: str = RECORDER_BINDING_KEY,
    *,
    replicas: int | None = None,
) -> None:
    """The recorders' queue, bound to the lifecycle events exchange (declared here too)."""
    await declare_queue(connection, name, replicated(RECORDER_QUEUE_ARGUMENTS, replicas))
    try:
        async with connection.channel() as channel:
            exchange = await channel.declare_exchange(
                EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(name, passive=True)
            await queue.bind(exchange, binding_key)
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot bind {name!r}: {exc!r}") from exc


async def declare_status_exchange(channel: AbstractChannel) -> AbstractExchange:
    """Where dispatchers tell the operator page what they own (``schemas/status.py``)."""
    return await channel.declare_exchange(STATUS_EXCHANGE, ExchangeType.FANOUT, durable=True)
