"""broker.transport: what our connections write in one event-loop round reaches the socket
as one write, in order; whatever waits on the socket (drain, close) writes it first."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq

from broker.connection import Nodes, connect, connect_robust
from broker.transport import CorkedWriter


async def _pair() -> tuple[CorkedWriter, asyncio.StreamReader, asyncio.Server, list[int]]:
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
    writer = CorkedWriter(transport, protocol, reader, loop)
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
