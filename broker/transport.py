"""The TCP transport of our broker connections: a round's frames in one socket write.

aiormq's writer task hands each queued frame run to the socket on its own:
``transport.write`` sends at once when nothing is buffered, so the ledger
record, the work, the events and the acknowledgements of one dispatcher flush,
or a worker's result and the acknowledgement after it, were a ``send()`` each
(with the broker woken for each). On this 2-core machine that system call was
the largest single item of the dispatcher's and the worker's profiles
(``_SelectorSocketTransport.write``, 15-17 % of their busy time).

``CorkedWriter`` collects what is written within one event-loop round and
writes it as one, in order, at the start of the next round. Whatever waits on
the socket still does: ``drain`` (which aiormq awaits for every frame that
asks for it, and before closing) writes what is collected first, and so do
``write_eof`` and ``close``. TLS connections (``amqps``) keep aiormq's own
transport.

A connection may also *linger* (``linger`` seconds, 0 by default): what is
written then waits up to that long for more, so the writes of several rounds
share one ``send()``; ``LINGER_BYTES`` collected go at the next round
regardless. The worker lingers (``POLOS_WORKER_WRITE_LINGER_SECONDS``): at
a few hundred executions a second a round rarely holds more than one
execution's result or acknowledgement, and nothing waits on those but the
result's reader. The order of the bytes never changes, only when they leave.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

_LIMIT = 2**16  # asyncio.open_connection's default buffer limit
# A lingering writer sends at the next round once it holds this much.
LINGER_BYTES = 2**16


class CorkedWriter(asyncio.StreamWriter):
    """A ``StreamWriter`` whose writes of one event-loop round reach the transport as one."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.BaseProtocol,
        reader: asyncio.StreamReader | None,
        loop: asyncio.AbstractEventLoop,
        *,
        linger: float = 0.0,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._corked_loop = loop
        self._linger = linger
        self._parts: list[bytes] = []
        self._size = 0
        self._scheduled: asyncio.Handle | None = None
        self._soon = False  # the scheduled uncork is at the next round

    def write(self, data: bytes | bytearray | memoryview) -> None:
        part = bytes(data)
        self._parts.append(part)
        if self._linger <= 0:
            if self._scheduled is None:
                self._scheduled = self._corked_loop.call_soon(self.uncork)
            return
        self._size += len(part)
        if self._scheduled is None:
            if self._size >= LINGER_BYTES:
                self._soon = True
                self._scheduled = self._corked_loop.call_soon(self.uncork)
            else:
                self._scheduled = self._corked_loop.call_later(self._linger, self.uncork)
        elif not self._soon and self._size >= LINGER_BYTES:
            self._scheduled.cancel()
            self._soon = True
            self._scheduled = self._corked_loop.call_soon(self.uncork)

    def writelines(self, data: Any) -> None:
        for part in data:
            self.write(part)

    def uncork(self) -> None:
        """Write what was collected (when its time comes, or now before anything waits)."""
        scheduled = self._scheduled
        if scheduled is not None:
            self._scheduled = None
            if self._linger > 0:
                # Early (drain, close, or the linger's end now): no second uncork.
                scheduled.cancel()
                self._soon = False
        if not self._parts:
            return
        parts, self._parts = self._parts, []
        self._size = 0
        self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    async def drain(self) -> None:
        self.uncork()
        await super().drain()

    def write_eof(self) -> None:
        self.uncork()
        super().write_eof()

    def close(self) -> None:
        self.uncork()
        super().close()


class CorkedTCP(TransportFactory):
    """aiormq's ``TCPTransportFactory``, with a ``CorkedWriter`` (lingering ``linger`` s)."""

    def __init__(self, linger: float = 0.0) -> None:
        if linger < 0:
            raise ValueError("a write linger cannot be negative")
        self.linger = linger

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kwargs.pop("ssl_context_provider", None)  # plain TCP, as aiormq's own ignores it
        limit = kwargs.pop("limit", _LIMIT)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            # aiormq has filled in the port (5672) where the URL had none.
            transport, _ = await loop.create_connection(
                lambda: protocol, host=url.host or "localhost", port=url.port or 5672, **kwargs
            )
        except OSError as e:
            raise AMQPConnectionError(*e.args) from e
        return reader, CorkedWriter(transport, protocol, reader, loop, linger=self.linger)


CORKED_TCP = CorkedTCP()


def transport_for(url: URL | str, *, linger: float = 0.0) -> TransportFactory | None:
    """The transport factory for a connection to ``url`` (None: aiormq's default)."""
    if URL(str(url)).scheme != "amqp":
        return None
    return CORKED_TCP if linger <= 0 else CorkedTCP(linger)
