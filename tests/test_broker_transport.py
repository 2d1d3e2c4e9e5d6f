"""broker.transport: what our connections write in one event-loop round reaches the socket
as one write, in order; whatever waits on the socket (drain, close) writes it first."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq

from broker.connection import Nodes, connect, connect_robust
from broker.transport import LINGER_BYTES, CorkedWriter


async def _pair(
    linger: float = 0.0,
) -> tuple[CorkedWriter, asyncio.StreamReader, asyncio.Server, list[int]]:
    """A CorkedWriter to a local server that counts the reads it gets."""
    received = asyncio.Queue[bytes]()
    reads: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            reads.append(len(data))
            await received.put(data)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", port)
    writer = CorkedWriter(transport, protocol, reader, loop, linger=linger)
    writer.received = received  # type: ignore[attr-defined]
    return writer, reader, server, reads


async def _read(writer: CorkedWriter, size: int) -> bytes:
    received: asyncio.Queue[bytes] = writer.received  # type: ignore[attr-defined]
    data = b""
    async with asyncio.timeout(5):
        while len(data) < size:
            data += await received.get()
    return data


async def test_the_writes_of_a_round_go_out_together_in_order() -> None:
    writer, _, server, _ = await _pair()
    sent: list[bytes] = []
    transport_write = writer.transport.write

    def record(data: bytes | bytearray | memoryview) -> None:
        sent.append(bytes(data))
        transport_write(data)

    writer.transport.write = record  # type: ignore[method-assign]
    for n in range(50):
        writer.write(b"frame-%02d;" % n)
    assert sent == []  # nothing before the round ends

    assert await _read(writer, 50 * 9) == b"".join(b"frame-%02d;" % n for n in range(50))
    assert len(sent) == 1
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_drain_and_close_write_what_was_collected_first() -> None:
    writer, _, server, _ = await _pair()
    sent: list[bytes] = []
    transport_write = writer.transport.write

    def record(data: bytes | bytearray | memoryview) -> None:
        sent.append(bytes(data))
        transport_write(data)

    writer.transport.write = record  # type: ignore[method-assign]
    writer.write(b"a")
    await writer.drain()
    assert sent == [b"a"]
    writer.write(b"b")
    writer.close()
    assert sent == [b"a", b"b"]
    assert await _read(writer, 2) == b"ab"
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


def _recorded(writer: CorkedWriter) -> list[tuple[float, bytes]]:
    """What reaches the transport, with the loop time of each write."""
    sent: list[tuple[float, bytes]] = []
    transport_write = writer.transport.write
    loop = asyncio.get_running_loop()

    def record(data: bytes | bytearray | memoryview) -> None:
        sent.append((loop.time(), bytes(data)))
        transport_write(data)

    writer.transport.write = record  # type: ignore[method-assign]
    return sent


async def _closed(writer: CorkedWriter, server: asyncio.Server) -> None:
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_a_lingering_writer_joins_the_writes_of_several_rounds_in_order() -> None:
    writer, _, server, _ = await _pair(linger=0.05)
    sent = _recorded(writer)
    loop = asyncio.get_running_loop()
    first = loop.time()
    for n in range(10):
        writer.write(b"frame-%02d;" % n)
        await asyncio.sleep(0)  # a round each
        await asyncio.sleep(0)
    assert sent == []  # rounds have passed, the linger has not

    assert await _read(writer, 10 * 9) == b"".join(b"frame-%02d;" % n for n in range(10))
    assert len(sent) == 1
    assert 0.04 <= sent[0][0] - first < 0.5  # when the linger of the first write ended
    # And again: a later write lingers from its own start.
    writer.write(b"later")
    assert await _read(writer, 5) == b"later"
    assert len(sent) == 2
    await _closed(writer, server)


async def test_a_lingering_writer_sends_a_full_buffer_at_the_next_round() -> None:
    writer, _, server, _ = await _pair(linger=10.0)
    sent = _recorded(writer)
    writer.write(b"x" * (LINGER_BYTES - 1))
    await asyncio.sleep(0.01)
    assert sent == []
    writer.write(b"y")
    writer.write(b"z")  # the same round: it goes too
    data = await _read(writer, LINGER_BYTES + 1)
    assert data == b"x" * (LINGER_BYTES - 1) + b"yz"
    assert len(sent) == 1
    await _closed(writer, server)


async def test_drain_and_close_do_not_wait_for_the_linger() -> None:
    writer, _, server, _ = await _pair(linger=10.0)
    sent = _recorded(writer)
    writer.write(b"a")
    writer.write(b"b")
    await writer.drain()
    assert [data for _, data in sent] == [b"ab"]
    writer.write(b"c")
    await asyncio.sleep(0.01)
    assert [data for _, data in sent] == [b"ab"]
    writer.close()
    assert [data for _, data in sent] == [b"ab", b"c"]
    assert await _read(writer, 3) == b"abc"
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_a_linger_ended_early_does_not_cut_the_next_one_short() -> None:
    writer, _, server, _ = await _pair(linger=0.2)
    sent = _recorded(writer)
    loop = asyncio.get_running_loop()
    writer.write(b"a")
    await writer.drain()  # ends the first linger early
    await asyncio.sleep(0.1)
    written = loop.time()
    writer.write(b"b")
    await asyncio.sleep(0.15)  # the first linger's timer would have fired by now
    assert [data for _, data in sent] == [b"a"]
    await _read(writer, 2)
    assert sent[1][0] - written >= 0.19
    await _closed(writer, server)


async def test_our_connections_use_it_and_work(amqp_url: str, uid: str) -> None:
    for connection in (
        await connect(Nodes.parse(amqp_url), "test"),
        await connect_robust(Nodes.parse(amqp_url), "test"),
    ):
        underlay = connection.transport
        assert underlay is not None
        assert isinstance(underlay.connection, aiormq.Connection)
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{uid}-t", exclusive=True)
        for n in range(20):
            await channel.default_exchange.publish(aio_pika.Message(b"%d" % n), queue.name)
        got = [(await queue.get(timeout=5)).body for _ in range(20)]
        assert got == [b"%d" % n for n in range(20)]
        writers = [
            task.get_coro().cr_frame.f_locals.get("writer")  # type: ignore[union-attr]
            for task in asyncio.all_tasks()
            if task.get_coro().__qualname__.endswith("__writer")  # type: ignore[union-attr]
        ]
        assert any(isinstance(w, CorkedWriter) for w in writers)
        await connection.close()
