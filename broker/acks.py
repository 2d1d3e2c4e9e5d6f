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

A round's acknowledgements are also coalesced: one ``basic.ack`` with
``multiple`` settles every delivery of the channel up to its tag, so where
every tag below the round's highest is settled already (or in this round),
one frame stands for them all. The broker's work is per frame, not per tag: a
quorum queue's delivery and acknowledgement took 125-155 µs of broker CPU per
message acknowledged one by one, 33-38 µs acknowledged fifty to a frame. What
is safe is decided by ``plan_round``, pure, from ``Settled`` (which tags of the
channel are settled): a tag still held (a delivery waiting for a slot, a
ledger record until its checkpoint) stops the coalescing at it, and later
tags go one by one until it is settled. ``multiple`` must name a tag the
broker still holds (it answers an unknown one with PRECONDITION_FAILED and
closes the channel), so it is always a tag of this round; rounds with a
negative acknowledgement go as made.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, cast

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
_MULTIPLE, _REQUEUE = 0b01, 0b10
_END = b"\xce"

# What was made of a delivery in a round.
ACK: Final = 0
REQUEUE: Final = 1  # nack, back to its queue
DROP: Final = 2  # nack, dead-lettered or discarded

# Settled tags above the floor kept before giving up coalescing on a channel
# (a delivery held for good, as a no-ack consumer's would be, stops the floor).
MAX_ABOVE = 65_536


def ack_frame(channel_number: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    bits = _MULTIPLE if multiple else 0
    return _SETTLE.pack(1, channel_number, _SIZE, 60, _ACK, delivery_tag, bits) + _END


def nack_frame(channel_number: int, delivery_tag: int, *, requeue: bool) -> bytes:
    bits = _REQUEUE if requeue else 0
    return _SETTLE.pack(1, channel_number, _SIZE, 60, _NACK, delivery_tag, bits) + _END


@dataclass(slots=True)
class Settled:
    """Which delivery tags of a channel are settled: all up to ``floor``, and ``above``.

    A channel's tags are 1, 2, 3 ... in delivery order.
    """

    floor: int = 0
    above: set[int] = field(default_factory=set)
    coalescing: bool = True

    def add(self, tags: Sequence[int]) -> None:
        above = self.above
        above.update(tags)
        floor = self.floor
        while floor + 1 in above:
            floor += 1
            above.discard(floor)
        self.floor = floor
        if len(above) > MAX_ABOVE:
            self.coalescing = False
            above.clear()


# A frame to send: (tag, what, multiple).
Frame = tuple[int, int, bool]


def plan_round(settled: Settled, made: Sequence[tuple[int, int]]) -> list[Frame]:
    """The frames that settle ``made`` (``(tag, ACK | REQUEUE | DROP)`` in the order made).

    Records ``made`` in ``settled``. Acknowledgements only: one ``multiple`` at the
    highest tag of the round below which every tag is settled, then the rest one
    by one. A round with a negative acknowledgement goes as made.
    """
    tags = [tag for tag, _ in made]
    if not settled.coalescing:
        return [(tag, what, False) for tag, what in made]
    settled.add(tags)
    if len(made) == 1 or any(what != ACK for _, what in made):
        return [(tag, what, False) for tag, what in made]
    floor = settled.floor
    covered = [tag for tag in tags if tag <= floor]
    frames: list[Frame] = []
    if covered:
        frames.append((max(covered), ACK, len(covered) > 1))
    frames.extend((tag, ACK, False) for tag in tags if tag > floor)
    return frames


def frames_bytes(channel_number: int, frames: Sequence[Frame]) -> bytes:
    out = []
    for tag, what, multiple in frames:
        if what == ACK:
            out.append(ack_frame(channel_number, tag, multiple=multiple))
        else:
            out.append(nack_frame(channel_number, tag, requeue=what == REQUEUE))
    return out[0] if len(out) == 1 else b"".join(out)


class Acks:
    """The acknowledgements of one aiormq channel, written together."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = cast(aiormq.Channel, channel)
        self._pending: list[tuple[int, int]] = []  # (tag, ACK | REQUEUE | DROP)
        self._settled = Settled()
        self._soon: asyncio.Handle | None = None
        self._task: asyncio.Task[None] | None = None

    def ack(self, delivery_tag: int) -> None:
        """Queue ``basic.ack``; raises ``ChannelInvalidStateError`` if the channel is closed."""
        self._check_open()
        self._add((delivery_tag, ACK))

    def nack(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self._check_open()
        self._add((delivery_tag, REQUEUE if requeue else DROP))

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

    def _payload(self, made: list[tuple[int, int]]) -> bytes:
        number = self._channel.number
        assert number is not None
        return frames_bytes(number, plan_round(self._settled, made))

    def _add(self, settlement: tuple[int, int]) -> None:
        self._pending.append(settlement)
        if self._task is None and self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """The round's frames to the writer's queue now, or (full) through ``_write``."""
        self._soon = None
        if self._task is not None or not self._pending:
            return
        channel = self._channel
        queue = channel.write_queue
        if queue.full():
            self._task = asyncio.get_running_loop().create_task(self._write(), name="acks")
            return
        made, self._pending = self._pending, []
        if channel.is_closed:
            return  # the broker has taken the deliveries back
        queue.put_nowait(ChannelFrame(payload=self._payload(made), should_close=False))

    async def _write(self) -> None:
        channel = self._channel
        try:
            while self._pending:
                made, self._pending = self._pending, []
                if channel.is_closed:
                    return  # the broker has taken the deliveries back
                frame = ChannelFrame(payload=self._payload(made), should_close=False)
                # A bounded queue: waits (in order) while the writer is behind.
                await channel.write_queue.put(frame)
        except Exception as exc:  # the connection is going; so are the deliveries
            log.info("acknowledgements not written (%r); the broker requeues them", exc)
        finally:
            self._pending = []
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
