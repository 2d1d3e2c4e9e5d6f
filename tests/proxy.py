"""A TCP proxy between a process under test and the broker, to simulate broker loss.

Like aio-pika's own robustness tests: the shared broker is never stopped; the
test cuts the path to it instead.

- ``cut()``      closes every proxied connection and refuses new ones (each new
                 connection is accepted and closed at once, before a byte passes);
- ``restore()``  accepts and forwards again;
- ``hold()``     keeps forwarding client → broker but holds every broker → client
                 byte (a broker that stopped answering: no confirm ever arrives);
- ``release()``  delivers what was held and forwards normally again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Pipe:
    """One proxied client connection."""

    def __init__(
        self,
        proxy: TcpProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        self._proxy = proxy
        self._client_writer = client_writer
        self._upstream_writer = upstream_writer
        self._held: list[bytes] = []
        self._tasks = [
            asyncio.create_task(self._forward(client_reader, upstream_writer, to_client=False)),
            asyncio.create_task(self._forward(upstream_reader, client_writer, to_client=True)),
        ]

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if to_client and self._proxy.holding:
                    self._held.append(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def release(self) -> None:
        held, self._held = self._held, []
        if held and not self._client_writer.is_closing():
            self._client_writer.write(b"".join(held))

    def close(self) -> None:
        for writer in (self._client_writer, self._upstream_writer):
            if not writer.is_closing():
                with contextlib.suppress(Exception):
                    # An abort is what a dead network looks like: no graceful FIN
                    # handshake to wait for.
                    writer.transport.abort()
        self._proxy._pipes.discard(self)

    async def wait_closed(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = 0
        self.refusing = False
        self.holding = False
        self.accepted = 0
        self.refused = 0  # connections turned away while cut
        self._pipes: set[_Pipe] = set()
        self._all_pipes: list[_Pipe] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.close()
        for pipe in self._all_pipes:
            await pipe.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's."""
        from yarl import URL

        return str(URL(amqp_url).with_host(self.host).with_port(self.port))

    @property
    def connections(self) -> int:
        return len(self._pipes)

    def cut(self) -> None:
        self.refusing = True
        for pipe in list(self._pipes):
            pipe.close()

    def restore(self) -> None:
        self.refusing = False
        self.release()

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        for pipe in list(self._pipes):
            pipe.release()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        if self.refusing:  # cut while connecting upstream
            upstream_writer.transport.abort()
            writer.transport.abort()
            return
        self.accepted += 1
        pipe = _Pipe(self, reader, writer, upstream_reader, upstream_writer)
        self._pipes.add(pipe)
        self._all_pipes.append(pipe)


@asynccontextmanager
async def running_proxy(upstream_host: str, upstream_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_host, upstream_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
