"""Publishing with publisher confirms, many in flight, errors mapped to ours.

Each caller awaits only its own confirm, so thousands can be outstanding on a
channel at once; awaiting them one after another would cap a process at a few
hundred publishes per second.

The publishes that callers make on a channel within one event-loop iteration
go to the broker as one write (``_Batch``): with many requests in flight that
is several messages per system call and per wake-up of aiormq's writer,
instead of one each. Measured with 64 concurrent publishers on this machine:
about 27 µs of CPU per confirmed publish instead of about 80 through
``basic_publish``, and three times the rate. Each message still gets its own
delivery tag and its own confirm, registered in aiormq's channel exactly as
``basic_publish`` registers them, so acks, nacks, returns and channel loss
resolve it as before. Where the installed aiormq does not look as expected,
every publish goes through ``basic_publish`` instead. The frames of each
message come from ``broker.frames`` (laid out directly: about 1 µs, where
pamqp's marshalling took about 5 µs even with the Basic.Publish frame cached).

Confirm timeouts are kept by one timer per publisher (``_Deadlines``) rather
than an ``asyncio.timeout`` per publish, which cost several microseconds each
and one entry per publish in the event loop's timer heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec
from aiormq.abc import ChannelFrame
from pamqp.common import FieldTable

from broker.errors import BrokerUnavailable, ConfirmTimeout, PublishRejected, Unroutable
from broker.frames import PERSISTENT, TRANSIENT, publish_frames

log = logging.getLogger(__name__)

# A channel replaced after a nack is not replaced again within this time.
RENEW_SECONDS = 0.5


class ConfirmedPublisher:
    """Publishes to the default exchange (routing key = queue name), ``mandatory``, unless told
    otherwise."""

    def __init__(
        self, connection: AbstractConnection, *, confirm_timeout: float, channels: int = 2
    ) -> None:
        self._connection = connection
        self._confirm_timeout = confirm_timeout
        self._n_channels = max(1, channels)
        self._channels: list[AbstractChannel] = []
        self._batches: list[_Batch] = []
        self._deadlines = _Deadlines(confirm_timeout)
        self._next = itertools.cycle(range(self._n_channels))
        self._renewals: list[asyncio.Task[None] | None] = [None] * self._n_channels
        self._renewed_at = [-RENEW_SECONDS] * self._n_channels
        self._retiring: dict[AbstractChannel, asyncio.Task[None]] = {}
        self.in_flight = 0  # publishes awaiting their confirm (a metrics gauge reads it)
        # Called with the seconds each publish took to its confirm (or failure).
        self.observer: Callable[[float], None] | None = None

    async def start(self) -> None:
        for _ in range(self._n_channels):
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._channels.append(channel)
            self._batches.append(_Batch(channel))

    async def close(self) -> None:
        for batch in self._batches:
            await batch.close()
        self._batches.clear()
        await self._deadlines.close()
        for task in self._retiring.values():
            task.cancel()
        for channel in [*self._channels, *self._retiring]:
            if not channel.is_closed:
                await channel.close()
        self._channels.clear()
        self._retiring.clear()

    @property
    def available(self) -> bool:
        """Whether a publish can be attempted now (connection and a channel open)."""
        if self._connection.is_closed or not self._channels:
            return False
        return any(not channel.is_closed for channel in self._channels)

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        persistent: bool = True,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        exchange: str = "",
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm.

        ``exchange``/``mandatory`` serve fan-out publishes (cancels, lifecycle
        events) where no bound queue is a normal case, not an error.

        Raises ``BrokerUnavailable`` (no connection, channel lost), ``ConfirmTimeout``,
        ``PublishRejected`` (nack: the queue is full) or ``Unroutable`` (no such queue).
        """
        batch = self._pick_batch()
        observer = self.observer
        started = time.perf_counter() if observer is not None else 0.0
        self.in_flight += 1
        try:
            for attempt in range(2):
                item = _Publish(
                    body, exchange, routing_key, mandatory, message_id, persistent, headers or None
                )
                try:
                    await self._publish_on(batch, item, timeout)
                    return
                except aiormq.exceptions.DeliveryError as exc:
                    replacement = await self._replacement(batch) if attempt == 0 else None
                    if replacement is None:
                        raise PublishRejected(
                            f"broker rejected the publish to {routing_key!r}"
                        ) from exc
                    batch = replacement
        finally:
            self.in_flight -= 1
            if observer is not None:
                observer(time.perf_counter() - started)

    async def _publish_on(self, batch: _Batch, item: _Publish, timeout: float | None) -> None:
        """One publish on ``batch``, errors mapped (but a nack: the caller decides)."""
        routing_key = item.routing_key
        try:
            if timeout is None or timeout == self._confirm_timeout:
                await batch.publish(item, self._deadlines)
            else:
                async with asyncio.timeout(timeout):
                    await batch.publish(item, None)
        except aiormq.exceptions.PublishError as exc:  # returned, a DeliveryError too
            raise Unroutable(f"no queue {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError:
            raise
        except TimeoutError as exc:
            raise ConfirmTimeout(f"no confirm for {routing_key!r} within the timeout") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {exc!r}") from exc

    async def _replacement(self, nacked: _Batch) -> _Batch | None:
        """After a nack on ``nacked``: the batch of a fresh channel to try once more, or
        None when ``nacked`` is itself fresh (the queue really is full).

        RabbitMQ 3.10 nacks, for good, every publish of a channel whose first
        publish to a quorum queue came while that queue had no leader (a node
        was lost a moment ago): a channel that a process opened on failing
        over. A new channel starts clean; opened once per RENEW_SECONDS at most.
        """
        if nacked not in self._batches:
            return None  # closing
        index = self._batches.index(nacked)
        task = self._renewals[index]
        if task is None or task.done():
            loop = asyncio.get_running_loop()
            if loop.time() - self._renewed_at[index] < RENEW_SECONDS:
                return None
            self._renewed_at[index] = loop.time()
            task = self._renewals[index] = loop.create_task(self._renew(index))
        await asyncio.shield(task)
        current = self._batches[index] if index < len(self._batches) else None
        return current if current is not nacked else None

    async def _renew(self, index: int) -> None:
        try:
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("cannot replace a publishing channel: %r", exc)
            return
        old = self._channels[index]
        self._channels[index] = channel
        self._batches[index] = _Batch(channel)
        log.info("replaced a publishing channel after a nack")
        self._retiring[old] = asyncio.get_running_loop().create_task(self._retire(old))

    async def _retire(self, channel: AbstractChannel) -> None:
        # Its publishes in flight get their confirms, or time out, meanwhile.
        await asyncio.sleep(self._confirm_timeout)
        self._retiring.pop(channel, None)
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await channel.close()

    def _pick_batch(self) -> _Batch:
        if self._connection.is_closed or not self._channels:
            raise BrokerUnavailable("not connected to the broker")
        for _ in range(self._n_channels):
            index = next(self._next)
            if not self._channels[index].is_closed:
                return self._batches[index]
        raise BrokerUnavailable("no open channel to the broker")


@dataclass(slots=True)
class _Publish:
    body: bytes
    exchange: str
    routing_key: str
    mandatory: bool
    message_id: str
    persistent: bool
    headers: Mapping[str, Any] | None
    future: asyncio.Future[None] | None = None
    # Marshalled frames for channel ``number``: built when the publish is made, so
    # a message that cannot be encoded fails its own caller, not its whole batch.
    number: int = -1
    frames: bytes = b""

    def frames_for(self, underlay: aiormq.abc.AbstractChannel) -> bytes:
        return publish_frames(
            underlay.number,
            self.exchange,
            self.routing_key,
            self.body,
            message_id=self.message_id,
            persistent=self.persistent,
            headers=self.headers,
            mandatory=self.mandatory,
            max_content_size=cast(aiormq.Channel, underlay).max_content_size,
        )

    def properties(self) -> spec.Basic.Properties:
        """For ``basic_publish``, where the channel cannot be batched."""
        return spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT if self.persistent else TRANSIENT,
            message_id=self.message_id,
            headers=cast(FieldTable, dict(self.headers)) if self.headers else None,
        )


# What _Batch uses of aiormq's Channel besides its public API (checked per channel).
_CHANNEL_INTERNALS = (
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "lock",
    "write_queue",
    "create_future",
    "max_content_size",
)


def _can_batch(underlay: aiormq.abc.AbstractChannel) -> bool:
    return bool(getattr(underlay, "publisher_confirms", False)) and all(
        hasattr(underlay, name) for name in _CHANNEL_INTERNALS
    )


class _Batch:
    """The publishes of one channel, written to the socket together.

    A publish joins the pending list; one flush task per channel takes what is
    pending, registers a delivery tag and a confirm future for each message
    under the channel lock (as ``basic_publish`` does) and hands all their
    frames to aiormq's writer as one ``ChannelFrame``. Publishes that arrive
    while a flush waits go out in its next round.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._pending: list[_Publish] = []
        self._task: asyncio.Task[None] | None = None
        self._checked: tuple[aiormq.abc.AbstractChannel | None, bool] = (None, False)

    async def publish(self, item: _Publish, deadlines: _Deadlines | None) -> None:
        """Send ``item`` and wait for its confirm; ``deadlines`` (if given) times it out."""
        underlay = await self._channel.get_underlay_channel()
        checked, batchable = self._checked
        if underlay is not checked:  # a new channel after a reconnect
            batchable = _can_batch(underlay)
            self._checked = (underlay, batchable)
        if not batchable:
            await cast(aiormq.Channel, underlay).basic_publish(
                item.body,
                exchange=item.exchange,
                routing_key=item.routing_key,
                properties=item.properties(),
                mandatory=item.mandatory,
                timeout=deadlines.timeout if deadlines is not None else None,
                wait=False,
            )
            return
        item.number = underlay.number
        item.frames = item.frames_for(underlay)
        item.future = asyncio.get_running_loop().create_future()
        if deadlines is not None:
            deadlines.watch(item.future)
        self._pending.append(item)
        if self._task is None:
            self._task = asyncio.create_task(self._flush(), name="publish-batch")
        await item.future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        _fail(self._pending, aiormq.exceptions.ChannelInvalidStateError("publisher closed"))
        self._pending = []

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send([p for p in batch if p.future is not None and not p.future.done()])
        finally:
            self._task = None

    async def _send(self, batch: list[_Publish]) -> None:
        if not batch:
            return
        try:
            underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
            async with underlay.lock:
                first_tag = underlay.delivery_tag + 1
                try:
                    payload = self._register(underlay, batch)
                    await underlay.write_queue.put(ChannelFrame(payload, should_close=False))
                except BaseException:
                    # Nothing reached the writer: give the tags back, as basic_publish does.
                    _unregister(underlay, first_tag)
                    raise
        except asyncio.CancelledError:
            _fail(batch, aiormq.exceptions.ChannelInvalidStateError("publish cancelled"))
            raise
        except Exception as exc:
            _fail(batch, exc)

    def _register(self, underlay: aiormq.Channel, batch: list[_Publish]) -> bytes:
        """Delivery tags and confirm futures for ``batch``, in order; returns its frames."""
        parts: list[bytes] = []
        for item in batch:
            assert item.future is not None
            underlay.delivery_tag += 1
            tag = underlay.delivery_tag
            message_id = item.message_id
            confirmation = underlay.create_future()
            underlay.confirmations[tag] = confirmation
            # aiormq finds the confirm of a returned (unroutable) message by its id.
            underlay.message_id_delivery_tag[message_id] = tag
            confirmation.add_done_callback(
                functools.partial(_settle, underlay, message_id, tag, item.future)
            )
            # A reconnect in between may have given the channel another number.
            same = item.number == underlay.number
            parts.append(item.frames if same else item.frames_for(underlay))
        return b"".join(parts)


class _Deadlines:
    """Fails with ``TimeoutError`` each watched future not done ``timeout`` seconds after it
    was watched, within ``TICK`` seconds; one timer task for all of them.

    All share one timeout, so deadlines arrive in the order futures are watched
    and a deque ordered by deadline is all the bookkeeping needed.
    """

    TICK = 0.05

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def watch(self, future: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        self._queue.append((loop.time() + self.timeout, future))
        if self._task is None:
            self._task = loop.create_task(self._expire(), name="publish-deadlines")

    async def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        try:
            while queue:
                now = loop.time()
                while queue and (queue[0][1].done() or queue[0][0] <= now):
                    _, future = queue.popleft()
                    if not future.done():
                        future.set_exception(TimeoutError())
                if queue:
                    await asyncio.sleep(max(queue[0][0] - now, self.TICK))
        finally:
            self._task = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._queue.clear()


def _settle(
    underlay: aiormq.Channel,
    message_id: str,
    tag: int,
    future: asyncio.Future[None],
    confirmation: asyncio.Future[Any],
) -> None:
    """Pass the broker's answer for one message (or the channel's loss) to its caller."""
    if underlay.message_id_delivery_tag.get(message_id) == tag:
        del underlay.message_id_delivery_tag[message_id]
    if future.done():
        return  # the caller gave up (timeout, cancellation)
    if confirmation.cancelled():
        future.set_exception(aiormq.exceptions.ChannelInvalidStateError("channel closed"))
        return
    exc = confirmation.exception()
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(None)


def _unregister(underlay: aiormq.Channel, first_tag: int) -> None:
    for tag in range(first_tag, underlay.delivery_tag + 1):
        confirmation = underlay.confirmations.pop(tag, None)
        if isinstance(confirmation, asyncio.Future):
            confirmation.cancel()
    underlay.delivery_tag = first_tag - 1


def _fail(batch: list[_Publish], exc: BaseException) -> None:
    for item in batch:
        if item.future is not None and not item.future.done():
            item.future.set_exception(exc)
