"""The recorder: lifecycle events from ``polos.recorder`` into the execution store.

    polos.events (topic) ──#──► polos.recorder (quorum) ──► Recorder ──script call──► Redis
                                                                          └─PUBLISH─► live streams

- Deliveries are batched (up to ``recorder_batch_size`` events, or whatever
  arrived within ``recorder_batch_wait_seconds``) and written in one round trip
  (one script call per project: ``store.update``).
- A delivery is acknowledged only after its batch was written. While Redis is
  away the batch is retried with backoff and held unacknowledged; the prefetch
  bounds what is held, the rest waits in the queue. If the recorder dies
  meanwhile, the broker redelivers to another recorder. Writes are idempotent
  (see ``store.update``), so a redelivery is harmless.
- A delivery is a batch of events (``schemas.dispatch.EventBatch``), or one
  event as published before batches; every event of it is written, and then
  it is acknowledged. Once written, each event is also published on its
  execution's Redis channel (``store.layout.events_channel``, in the same
  script call), which the gateways' live event streams follow.
- An undecodable message is dead-lettered whole with the reason; an event of a
  batch that does not decode, or that Redis refuses, is dead-lettered alone
  and the rest of its batch recorded. Nothing is retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aio_pika
import aiormq
import redis.asyncio as aioredis
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from broker.connection import connect_robust
from broker.deadletter import dead_letter
from broker.errors import BrokerError, BrokerUnavailable
from broker.publisher import ConfirmedPublisher
from broker.topology import declare_dead_letters, declare_recorder_queue
from recorder.delivery import Delivery
from recorder.settings import RecorderSettings
from schemas.dispatch import LifecycleEvent
from store import ExecutionStore, StoreError, StoreUnavailable, open_redis

log = logging.getLogger(__name__)

# Acknowledging on a channel that was lost (and restored by aio-pika with new
# delivery tags) fails; the broker redelivers those messages, which is harmless.
_ACK_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
)


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """The channel a delivery came on, None once that channel is closed."""
    try:
        return message.channel
    except _ACK_ERRORS:
        return None


@dataclass(slots=True)
class RecorderStats:
    received: int = 0
    recorded: int = 0  # events written to the store
    acked: int = 0
    dead_lettered: int = 0
    write_failures: int = 0  # attempts that found the store unavailable
    # The newest event written: its ``at``, and when (Unix seconds) it was written.
    last_event_at: str | None = None
    last_written: float = 0.0


class Recorder:
    """Consume lifecycle events and record them; ``start()`` and ``stop()``.

    Runs as its own process (``python -m recorder``) or inside another one:
    pass that process's robust ``connection`` (and, if it has one, its Redis
    client) and the recorder opens its own channel on it and leaves the
    connection open on ``stop()``.
    """

    def __init__(
        self,
        settings: RecorderSettings,
        *,
        connection: AbstractRobustConnection | None = None,
        redis_client: aioredis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self._connection = connection
        self._owns_connection = connection is None
        self._redis = redis_client
        self._owns_redis = redis_client is None
        self.store: ExecutionStore | None = None
        self.stats = RecorderStats()
        self.store_available = True
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._abandon = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsettled = 0

    async def backlog(self) -> int | None:
        """Events waiting in the recorders' queue (the broker's count); None if unknown."""
        if self._connection is None or self._connection.is_closed:
            return None
        # A channel of its own: a failed declare closes it, not the consumer's.
        async with self._connection.channel() as channel:
            queue = await channel.declare_queue(self.settings.recorder_queue, passive=True)
            return queue.declaration_result.message_count

    @property
    def pending(self) -> int:
        """Deliveries received and not yet settled (acknowledged, dead-lettered, requeued)."""
        return self._unsettled

    @property
    def running(self) -> bool:
        """Consuming and recording; False once stopped or if the batch loop failed."""
        return self._task is not None and not self._task.done()

    async def wait_stopped(self) -> None:
        """Until the batch loop ends (``stop()``, or a bug: then its exception is raised)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def start(self) -> None:
        """Declare the queue and start consuming. Raises ``BrokerUnavailable``.

        Redis need not be up: events are held until it is.
        """
        settings = self.settings
        if self._redis is None:
            self._redis = open_redis(
                settings.redis_url.get_secret_value(),
                timeout_seconds=settings.redis_timeout_seconds,
            )
        self.store = ExecutionStore(
            self._redis, settings.retention_seconds, key_prefix=settings.redis_key_prefix
        )
        try:
            if self._connection is None:
                self._connection = await connect_robust(
                    settings.broker_nodes(),
                    "recorder",
                    max_backoff=settings.reconnect_interval_seconds,
                )
            self._publisher = ConfirmedPublisher(
                self._connection, confirm_timeout=settings.confirm_timeout_seconds, channels=1
            )
            await self._publisher.start()
            replicas = settings.quorum_group_size
            await declare_dead_letters(self._connection, replicas=replicas)
            await declare_recorder_queue(
                self._connection,
                settings.recorder_queue,
                settings.recorder_binding_key,
                replicas=replicas,
            )
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=settings.recorder_prefetch)
            self._queue = await self._channel.declare_queue(settings.recorder_queue, passive=True)
            # Deliveries wait in the inbox until the batch loop below takes them.
            self._consumer_tag = await self._queue.consume(self._on_message)
        except (
            BrokerError,
            aiormq.exceptions.AMQPError,
            aio_pika.exceptions.AMQPError,
            OSError,
        ) as exc:
            await self._close_resources()
            raise BrokerUnavailable(f"recorder cannot start: {exc!r}") from exc
        self._task = asyncio.create_task(self._run(), name="recorder")
        log.info(
            "recording events from %s (prefetch %d, batches of %d)",
            settings.recorder_queue,
            settings.recorder_prefetch,
            settings.recorder_batch_size,
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Stop consuming, record what was received (for up to ``timeout``), and close.

        What could not be recorded by then stays unacknowledged and goes back
        to the queue when the channel closes.
        """
        if timeout is None:
            timeout = self.settings.shutdown_timeout_seconds
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(*_ACK_ERRORS):
                await self._queue.cancel(self._consumer_tag)
            self._consumer_tag = None
        if self._task is not None:
            self._inbox.put_nowait(None)  # after everything already received
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
            except TimeoutError:
                log.warning("recorder stopping with %d events unrecorded", self.pending)
                self._abandon.set()
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except Exception:
                log.exception("the recorder's batch loop had failed")
            self._task = None
        await self._close_resources()

    async def _close_resources(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*_ACK_ERRORS):
                await self._channel.close()
        self._channel = None
        if self._publisher is not None:
            with contextlib.suppress(*_ACK_ERRORS):
                await self._publisher.close()
            self._publisher = None
        if self._owns_connection and self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.stats.received += 1
        self._unsettled += 1
        self._inbox.put_nowait(message)

    # -- the batch loop ------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        size = self.settings.recorder_batch_size
        wait = self.settings.recorder_batch_wait_seconds
        while True:
            first = await self._inbox.get()
            if first is None:
                return
            batch = [Delivery.of(first)]
            events = len(batch[0].events)
            stop_after = False
            deadline = loop.time() + wait
            # Up to ``size`` events (a delivery is a batch of them) or the wait.
            while events < size:
                try:
                    item = self._inbox.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            item = await self._inbox.get()
                    except TimeoutError:
                        break
                if item is None:
                    stop_after = True
                    break
                batch.append(Delivery.of(item))
                events += len(batch[-1].events)
            await self._process(batch)
            if stop_after:
                return

    async def _process(self, batch: Sequence[Delivery]) -> None:
        live: list[Delivery] = []
        for delivery in batch:
            if delivery.poison is not None:
                await self._dead_letter(delivery.message, delivery.poison)
            elif await self._dead_letter_rejected(delivery):
                live.append(delivery)
        if not live:
            return
        events = [event for d in live for event in d.events]
        bodies = [body for d in live for body in d.bodies]
        done = await self._write(events, bodies)
        if done is None:
            return  # abandoned (stopping with the store away): left unacknowledged
        if done:
            self.stats.recorded += len(events)
            self.stats.last_event_at, self.stats.last_written = events[-1].at, time.time()
            await self._ack_batch([d.message for d in live])
            return
        # Redis refused something in the batch: find which, one event at a time.
        for delivery in live:
            settled = False
            for event, body in zip(delivery.events, delivery.bodies, strict=True):
                one = await self._write([event], [body])
                if one is None:
                    return
                if one:
                    self.stats.recorded += 1
                    self.stats.last_event_at, self.stats.last_written = event.at, time.time()
                elif not await self._dead_letter_item(
                    delivery, body, "the execution store refused the event"
                ):
                    settled = True  # handed back whole
                    break
            if not settled:
                await self._ack([delivery.message])

    async def _write(
        self, events: Sequence[LifecycleEvent], bodies: Sequence[bytes]
    ) -> bool | None:
        """True once written, False if refused, None if abandoned while Redis is away."""
        assert self.store is not None
        delay = self.settings.recorder_retry_initial_seconds
        while True:
            try:
                await self.store.record(events, bodies)
            except StoreUnavailable as exc:
                self.stats.write_failures += 1
                if self.store_available:
                    self.store_available = False
                    log.warning("execution store unavailable, holding events: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._abandon.wait()
                if self._abandon.is_set():
                    return None
                delay = min(delay * 2, self.settings.recorder_retry_max_seconds)
                continue
            except StoreError as exc:
                log.error("execution store refused %d events: %s", len(events), exc)
                return False
            if not self.store_available:
                self.store_available = True
                log.info("execution store available again")
            return True

    async def _ack_batch(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """One ``multiple`` ack per channel instead of one frame per delivery.

        Safe because this channel carries only our consumer, deliveries reach
        the batch loop in delivery-tag order, and every earlier delivery has
        been settled already: acking "up to the last" acks exactly the batch.
        After a reconnect a batch may span two channels; each gets its own.
        """
        groups: list[tuple[object | None, list[AbstractIncomingMessage]]] = []
        for message in messages:
            channel = _channel_of(message)
            if groups and groups[-1][0] is channel:
                groups[-1][1].append(message)
            else:
                groups.append((channel, [message]))
        for channel, group in groups:
            if channel is None:
                # Delivered on a channel that died since (a broker restart): the
                # broker redelivers them, and recording them again is harmless.
                log.debug("%d deliveries on a lost channel: the broker redelivers them", len(group))
                self._unsettled -= len(group)
                continue
            if await self._acked(group[-1], settles=len(group), multiple=True):
                self.stats.acked += len(group)

    async def _ack(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        for message in messages:
            if await self._acked(message):
                self.stats.acked += 1

    async def _acked(
        self, message: AbstractIncomingMessage, *, settles: int = 1, multiple: bool = False
    ) -> bool:
        """Ack ``message`` (``multiple``: with the deliveries before it, ``settles`` in
        all); False if the ack failed, and the broker will redeliver them."""
        try:
            await message.ack(multiple=multiple)
        except _ACK_ERRORS as exc:
            log.debug("ack failed (the broker will redeliver): %r", exc)
            return False
        finally:
            self._unsettled -= settles
        return True

    async def _dead_letter_rejected(self, delivery: Delivery) -> bool:
        """Dead-letter the bad events of a batch, each alone; False if that failed (the
        delivery was then handed back whole, to be tried again)."""
        for body, reason in delivery.rejected:
            if not await self._dead_letter_item(delivery, body, reason):
                return False
        return True

    async def _dead_letter_item(self, delivery: Delivery, body: bytes, reason: str) -> bool:
        """One event of ``delivery`` to the dead letters; if that fails, the whole delivery
        goes back to the queue (its other events are written again then: harmless)."""
        assert self._publisher is not None
        try:
            await dead_letter(
                self._publisher, body, source_queue=self.settings.recorder_queue, reason=reason
            )
        except BrokerError as exc:
            log.warning("cannot dead-letter a poison event, requeueing its batch: %r", exc)
            with contextlib.suppress(*_ACK_ERRORS):
                await delivery.message.nack(requeue=True)
            self._unsettled -= 1
            return False
        log.warning("dead-lettered a lifecycle event: %s", reason)
        self.stats.dead_lettered += 1
        return True

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        assert self._publisher is not None
        try:
            await dead_letter(
                self._publisher,
                message.body,
                source_queue=self.settings.recorder_queue,
                reason=reason,
                message_id=message.message_id,
            )
        except BrokerError as exc:
            log.warning("cannot dead-letter a poison event, requeueing it: %r", exc)
            with contextlib.suppress(*_ACK_ERRORS):
                await message.nack(requeue=True)
            self._unsettled -= 1
            return
        log.warning("dead-lettered a lifecycle event message: %s", reason)
        if await self._acked(message):
            self.stats.dead_lettered += 1
