"""``broker.frame_reader`` reads what aiormq's own reader reads, frame for frame.

Every frame is marshalled by pamqp and read by both readers from the same
stream; the frames must be equal attribute for attribute (pamqp's types
included). The broker tests run on it too: every connection of the suite reads
with it once ``broker.connection`` connected.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import aio_pika
import aiormq.connection
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands, frame, header, heartbeat
from pamqp.body import ContentBody

from broker.connection import Nodes, connect
from broker.frame_reader import FrameReader

# aiormq's own reader (what FrameReader stands in for, installed or not).
ORIGINAL: type = FrameReader.__mro__[1]

BODY = b'{"execution_id":"x1","payload":{"n":1}}' * 20
STAMP = datetime.datetime(2026, 12, 1, 12, 30, 5, tzinfo=datetime.UTC)

FRAMES: list[tuple[str, Any]] = [
    (
        "deliver",
        commands.Basic.Deliver(
            consumer_tag="ctag1.0123456789abcdef",
            delivery_tag=123456789012,
            redelivered=False,
            exchange="",
            routing_key="polos.submit.p.q",
        ),
    ),
    (
        "deliver redelivered, unicode, long names",
        commands.Basic.Deliver(
            consumer_tag="c" * 255,
            delivery_tag=2**63 - 1,
            redelivered=True,
            exchange="polos.events",
            routing_key="é.ü.日本" * 20,
        ),
    ),
    ("ack", commands.Basic.Ack(delivery_tag=7, multiple=False)),
    ("ack multiple", commands.Basic.Ack(delivery_tag=2**40, multiple=True)),
    ("nack (pamqp)", commands.Basic.Nack(delivery_tag=9, multiple=True, requeue=False)),
    ("consume-ok (pamqp)", commands.Basic.ConsumeOk(consumer_tag="ctag")),
    (
        "channel close (pamqp)",
        commands.Channel.Close(
            reply_code=406, reply_text="PRECONDITION", class_id=60, method_id=40
        ),
    ),
    ("body", ContentBody(BODY)),
    # (No empty body frame: the broker sends none for an empty message, and pamqp
    # refuses one, where this reader would read it.)
    ("heartbeat (pamqp)", heartbeat.Heartbeat()),
    ("header, no properties", header.ContentHeader(0, 0, commands.Basic.Properties())),
    (
        "header, ours",
        header.ContentHeader(
            0,
            len(BODY),
            commands.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                message_id="0123456789abcdef0123456789abcdef",
            ),
        ),
    ),
    (
        "header, a quorum queue's redelivery",
        header.ContentHeader(
            0,
            len(BODY),
            commands.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                message_id="m",
                headers={"x-delivery-count": 3, "x-acquired-count": 4},
            ),
        ),
    ),
    (
        "header, every property",
        header.ContentHeader(
            0,
            2**40,
            commands.Basic.Properties(
                content_type="text/plain",
                content_encoding="gzip",
                headers={"a": "b", "n": -5, "t": True, "f": 1.5, "l": [1, "x"], "d": {"k": 1}},
                delivery_mode=1,
                priority=9,
                correlation_id="corr",
                reply_to="amq.rabbitmq.reply-to",
                expiration="60000",
                message_id="mid",
                timestamp=STAMP,
                message_type="kind",
                user_id="guest",
                app_id="polos",
            ),
        ),
    ),
]


def attributes(value: Any) -> Any:
    if isinstance(value, header.ContentHeader):
        return (
            "header",
            value.class_id,
            value.weight,
            value.body_size,
            attributes(value.properties),
        )
    if isinstance(value, ContentBody):
        return ("body", value.value)
    slots = [s for cls in type(value).__mro__ for s in getattr(cls, "__slots__", ())]
    return (
        type(value),
        {s: (getattr(value, s, "<unset>"), type(getattr(value, s, None))) for s in slots},
    )


async def read_all(receiver_class: type, data: bytes, count: int) -> list[Any]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    receiver = receiver_class(reader)
    receiver.started = True
    return [await receiver.get_frame() for _ in range(count)]


@pytest.mark.parametrize("channel", [0, 1, 2047])
async def test_every_frame_reads_as_aiormq_reads_it(channel: int) -> None:
    data = b"".join(frame.marshal(f, channel) for _, f in FRAMES)
    ours = await read_all(FrameReader, data, len(FRAMES))
    theirs = await read_all(ORIGINAL, data, len(FRAMES))
    for (name, _), (n1, c1, f1), (n2, c2, f2) in zip(FRAMES, ours, theirs, strict=True):
        assert (n1, c1) == (n2, c2), name
        assert type(f1) is type(f2), name
        assert attributes(f1) == attributes(f2), name


async def test_a_delivery_is_decoded_directly_not_by_pamqp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    original = frame.unmarshal

    def counted(data: bytes) -> Any:
        calls.append(data)
        return original(data)

    monkeypatch.setattr(frame, "unmarshal", counted)  # what broker.frame_reader falls back on
    named = dict(FRAMES)
    deliver, ours_header, body, ack = (
        named[name] for name in ("deliver", "header, a quorum queue's redelivery", "body", "ack")
    )
    data = b"".join(frame.marshal(f, 1) for f in (deliver, ours_header, body, ack))
    frames = await read_all(FrameReader, data, 4)
    assert [type(f) for _, _, f in frames] == [
        commands.Basic.Deliver,
        header.ContentHeader,
        ContentBody,
        commands.Basic.Ack,
    ]
    assert calls == []


async def test_a_stream_cut_short_is_a_lost_connection() -> None:
    data = frame.marshal(dict(FRAMES)["body"], 1)
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await read_all(FrameReader, data[:-5], 1)


async def test_a_frame_without_its_end_byte_is_invalid() -> None:
    data = bytearray(frame.marshal(dict(FRAMES)["deliver"], 1))
    data[-1] = 0
    with pytest.raises(InvalidFrameError):
        await read_all(FrameReader, bytes(data), 1)


async def test_a_malformed_delivery_is_invalid_as_pamqp_says() -> None:
    data = bytearray(frame.marshal(dict(FRAMES)["deliver"], 1))
    data[11] = 250  # the consumer tag's length, far past the frame's end
    with pytest.raises((InvalidFrameError, AMQPConnectionError)):
        await read_all(FrameReader, bytes(data), 1)
    with pytest.raises((InvalidFrameError, AMQPConnectionError)):
        await read_all(ORIGINAL, bytes(data), 1)


async def test_a_protocol_header_instead_of_a_frame_is_refused() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"AMQP\x00\x00\x09\x01")
    receiver = FrameReader(reader)
    with pytest.raises(ProtocolSyntaxError):
        await receiver.get_frame()


async def test_connections_of_ours_read_with_it(amqp_url: str) -> None:
    connection = await connect(Nodes((amqp_url,)), "test")
    try:
        assert aiormq.connection.FrameReceiver is FrameReader
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(BODY, message_id="m1"), routing_key=queue.name
        )
        message = await queue.get(timeout=5)
        assert (message.body, message.message_id) == (BODY, "m1")
    finally:
        await connection.close()


@pytest.mark.parametrize("piece", [1, 7, 13, 4096])
async def test_frames_cut_anywhere_by_the_socket_read_the_same(piece: int) -> None:
    big = ContentBody(b"y" * 200_000)  # more than one chunk of the reader
    frames = [f for _, f in FRAMES] + [big]
    data = b"".join(frame.marshal(f, 5) for f in frames)
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for at in range(0, len(data), piece):
            reader.feed_data(data[at : at + piece])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    receiver = FrameReader(reader)
    receiver.started = True
    ours = [await receiver.get_frame() for _ in frames]
    await feeding
    theirs = await read_all(ORIGINAL, data, len(frames))
    assert [attributes(f) for _, _, f in ours] == [attributes(f) for _, _, f in theirs]
    with pytest.raises(StopAsyncIteration):
        await receiver.get_frame()
