"""Acknowledgements many to a socket write.

``basic_ack`` marshals one frame with pamqp, queues it for aiormq's writer and
waits until the writer has handed it to the socket: one ``send()`` per
acknowledgement, and a caller that acknowledges several deliveries in turn
waits a writer round for each. In the dispatcher that was the largest single
cost of a flush (``socket.send``, 14 % of its busy time, about three
acknowledgements per execution).

``Acks`` keeps a channel's acknowledgements (and negative ones) made within one
event-loop round and hands them to aiormq's writer as one frame run, in the
order they were made, as ``broker.publisher`` does for publishes. An
acknowledgement is never answered by the broker, so nothing is lost by not
waiting for the socket: ``ack`` returns once the frame is queued, and
``flush`` waits until everything queued so far is with the writer (before a
channel is closed on purpose, so the close does not overtake them). A channel
that closes first has handed its deliveries back to their queues already, as
it would have with ``basic_ack``.

The round's frames go to the writer's queue from a ``call_soon`` callback
when it has room (nearly always): a task each round, as at first, was one
more task created, stepped and awaited per execution in the worker. Only a
full queue (the writer behind) takes a task that waits for room, and until it
is done later frames follow it, so their order stays the order made.

A round's acknowledgements of a settled prefix go as one frame. A channel's
delivery tags are 1, 2, 3, ... in delivery order, so ``Acks`` knows the floor
below which every tag has been settled through it; the round's acks at or below
the new floor go as one ``basic.ack`` with ``multiple`` set (its tag the highest
of them, which the broker still holds), the rest one by one, after the round's
nacks. The broker settles a multiple ack as one command to the queue (one Raft
entry for a quorum queue, instead of one per acknowledgement). A tag settled
some other way (a ``no_ack`` delivery, aio-pika's own ``ack``) is never below
the floor, so it only stops the floor there: nothing unsettled is ever covered
(``plan``, table-tested).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from typing import cast

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError

log = logging.getLogger(__name__)

# A method frame: type 1, channel, payload size 13 | class 60, method | delivery tag (8)
# | bits | frame end. Basic.Ack is method 80 (bit 0: multiple), Basic.Nack 120 (bit 0:
# multiple, bit 1: requeue).
_SETTLE = struct.Struct(">BHIHHQB")
_SIZE = 2 + 2 + 8 + 1
_ACK, _NACK = 80, 120
_END = b"\xce"
# Settled tags kept above a floor that does not move (a tag settled some other
# way, a delivery held for long): past this many, the channel's acknowledgements
# go one by one, as if no prefix were ever settled.
MAX_TRACKED = 100_000


def ack_frame(channel_number: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    return _SETTLE.pack(1, channel_number, _SIZE, 60, _ACK, delivery_tag, int(multiple)) + _END


def nack_frame(channel_number: int, delivery_tag: int, *, requeue: bool) -> bytes:
    bits = 0b10 if requeue else 0
    return _SETTLE.pack(1, channel_number, _SIZE, 60, _NACK, delivery_tag, bits) + _END


def plan(
    floor: int, above: set[int], acks: list[int], nacked: list[int]
) -> tuple[int, int | None, list[int]]:
    """How a round's acknowledgements go: (the new floor, the tag of one multiple
    ack or None, the tags acknowledged one by one).

    ``floor``: every tag up to it is settled; ``above``: the tags settled above it
    (updated in place: what the new floor covers leaves it). The multiple ack
    covers the round's acks at or below the new floor; its tag is the highest of
    them, so the broker holds it still (a multiple ack of a settled tag fails).
    """
    above.update(acks)
    above.update(nacked)
    while floor + 1 in above:
        floor += 1
        above.discard(floor)
    covered = [tag for tag in acks if tag <= floor]
    singles = [tag for tag in acks if tag > floor]
    if len(covered) > 1:
        return floor, max(covered), singles
    return floor, None, covered + singles


class Acks:
    """The acknowledgements of one aiormq channel, written together."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = cast(aiormq.Channel, channel)
        self._acks: list[int] = []  # this round's
        self._nacks: list[tuple[int, bool]] = []
        self._floor = 0  # every tag up to here was settled through us (-1: not tracked)
        self._above: set[int] = set()
        self._soon: asyncio.Handle | None = None
        self._task: asyncio.Task[None] | None = None

    def ack(self, delivery_tag: int) -> None:
        """Queue ``basic.ack``; raises ``ChannelInvalidStateError`` if the channel is closed."""
        self._check_open()
        self._acks.append(delivery_tag)
        self._schedule()

    def nack(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self._check_open()
        self._nacks.append((delivery_tag, requeue))
        self._schedule()

    async def flush(self) -> None:
        """Until what was queued so far is with aiormq's writer (or dropped with the channel)."""
        if self._soon is not None:
            self._soon.cancel()
            self._hand_over()
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    def _check_open(self) -> None:
        if self._channel.is_closed:
            raise ChannelInvalidStateError(f"{self._channel!r} closed")

    def _schedule(self) -> None:
        if self._task is None and self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._hand_over)

    def _take_payload(self) -> bytes | None:
        """The frames of what is queued (taken), or None if nothing is."""
        acks, nacks = self._acks, self._nacks
        if not acks and not nacks:
            return None
        self._acks, self._nacks = [], []
        number = self._channel.number
        assert number is not None
        if self._floor < 0:
            multiple, singles = None, acks  # gave up: see MAX_TRACKED
        else:
            self._floor, multiple, singles = plan(
                self._floor, self._above, acks, [tag for tag, _ in nacks]
            )
            if len(self._above) > MAX_TRACKED:
                log.info("%r: no settled prefix; acknowledging one by one", self._channel)
                self._floor, self._above = -1, set()
        frames = [nack_frame(number, tag, requeue=requeue) for tag, requeue in nacks]
        if multiple is not None:
            frames.append(ack_frame(number, multiple, multiple=True))
        frames.extend(ack_frame(number, tag) for tag in singles)
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def _hand_over(self) -> None:
        """The round's frames to the writer's queue now, or (full) through ``_write``."""
        self._soon = None
        if self._task is not None or not (self._acks or self._nacks):
            return
        channel = self._channel
        queue = channel.write_queue
        if queue.full():
            self._task = asyncio.get_running_loop().create_task(self._write(), name="acks")
            return
        if channel.is_closed:
            self._acks, self._nacks = [], []
            return  # the broker has taken the deliveries back
        payload = self._take_payload()
        if payload is not None:
            queue.put_nowait(ChannelFrame(payload=payload, should_close=False))

    async def _write(self) -> None:
        channel = self._channel
        try:
            while True:
                if channel.is_closed:
                    return  # the broker has taken the deliveries back
                payload = self._take_payload()
                if payload is None:
                    return
                # A bounded queue: waits (in order) while the writer is behind.
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        except Exception as exc:  # the connection is going; so are the deliveries
            log.info("acknowledgements not written (%r); the broker requeues them", exc)
        finally:
            self._acks, self._nacks = [], []
            self._task = None


_BY_CHANNEL: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, Acks] = (
    weakref.WeakKeyDictionary()
)


def acks_of(channel: aiormq.abc.AbstractChannel) -> Acks:
    """The ``Acks`` of ``channel`` (one per channel, so their order is the channel's)."""
    acks = _BY_CHANNEL.get(channel)
    if acks is None:
        acks = _BY_CHANNEL[channel] = Acks(channel)
    return acks


async def flush_all() -> None:
    """``flush`` every channel's acknowledgements (before a process closes its channels)."""
    await asyncio.gather(*(acks.flush() for acks in list(_BY_CHANNEL.values())))
