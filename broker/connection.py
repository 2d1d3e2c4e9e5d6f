"""Connecting to RabbitMQ: one node or several, failover, jittered backoff.

Every process takes its broker as ``POLOS_AMQP_URL``: one amqp URL, or the
nodes of a cluster as a comma-separated list of URLs, kombu's failover
convention (``;`` separates them too)::

    amqp://u:p@rabbit-1:5672/vh,amqp://u:p@rabbit-2:5672/vh,amqp://u:p@rabbit-3:5672/vh

    Nodes          the list, and which node is in use (a cursor shared by a
                   process's connections, so they meet on one node)
    connect        a plain connection: each node once, from the cursor on;
                   raises BrokerUnavailable if none answers
    connect_robust a FailoverConnection: aio-pika's robust connection (it
                   restores channels, QoS, queues, consumers), but a lost
                   node sends it to the next one at once; only after every
                   node failed in a row does it wait, with the backoff
    Backoff        exponential from 0.1 s, capped, each wait jittered
    retry          the one retry loop: an attempt until it succeeds, with a
                   Backoff between failures, until told to stop

How a robust connection rotates: aio-pika calls ``_on_connection_close``
both when an open connection is lost and when an attempt to connect fails,
then waits ``reconnect_interval`` before its next attempt on ``self.url``.
``FailoverConnection`` moves ``self.url`` to the next node there and sets the
wait: none until every node was tried, then the backoff. Nothing else of
aio-pika's reconnect is changed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aio_pika
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from broker import delivery, frame_reader
from broker.errors import BrokerUnavailable
from broker.transport import transport_for

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF_SECONDS = 0.1
DEFAULT_MAX_BACKOFF_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 10.0
# After a lost connection, how long a process waits once connected again before
# it uses the broker: quorum queues led by a lost node have no leader for a few
# hundred milliseconds, and RabbitMQ 3.10 nacks for good every publish of a
# channel whose first publish to such a queue falls in that window (measured:
# channels opened 0-0.3 s after a node's kill -9 stay nacked; 0.5 s later, fine).
SETTLE_SECONDS = 1.0
SCHEMES = ("amqp", "amqps")
_SEPARATORS = (",", ";")


def connection_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}"


def redacted(url: str | URL) -> str:
    """A URL fit for a log line or an error message: no password."""
    parsed = URL(url) if isinstance(url, str) else url
    return str(parsed.with_password("******")) if parsed.password else str(parsed)


def parse_urls(value: str) -> tuple[str, ...]:
    """The broker URLs in ``value`` (one, or a comma-separated list), checked.

    Raises ValueError naming the entry that is not an amqp URL (without its password).
    """
    text = value
    for separator in _SEPARATORS[1:]:
        text = text.replace(separator, _SEPARATORS[0])
    entries = [entry.strip() for entry in text.split(_SEPARATORS[0])]
    urls = [entry for entry in entries if entry]
    if not urls:
        raise ValueError("no broker URL given")
    for position, entry in enumerate(urls, start=1):
        where = f"broker URL {position} of {len(urls)}" if len(urls) > 1 else "the broker URL"
        try:
            parsed = URL(entry)
            parsed.port  # noqa: B018 (parsing the port is the check)
        except ValueError:
            raise ValueError(f"{where} is not a URL (an amqp://... address expected)") from None
        if parsed.scheme not in SCHEMES or not parsed.host:
            raise ValueError(
                f"{where} ({redacted(parsed)}) is not an amqp:// or amqps:// URL with a host"
            )
    return tuple(urls)


class Nodes:
    """The broker's nodes, in the order given, and which one is in use.

    Pure: fed ``connected()`` and ``moved_on()``, it says where to go next.
    A process's connections share one ``Nodes``: they start where the last one
    succeeded, and a node found lost by one is skipped by the next.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no broker URL given")
        self.urls = tuple(urls)
        self._current = 0
        self._misses = 0  # nodes lost or unreachable in a row, since the last success

    def __len__(self) -> int:
        return len(self.urls)

    @classmethod
    def parse(cls, value: str) -> Nodes:
        return cls(parse_urls(value))

    @property
    def current(self) -> str:
        return self.urls[self._current]

    @property
    def position(self) -> int:
        """Which node is current; it changes each time one is found lost."""
        return self._current

    def connected(self) -> None:
        self._misses = 0

    def moved_on(self) -> bool:
        """The node in use was lost or did not answer: the next one is current.

        True when every node has now failed in a row (time to wait), False
        while some were not tried yet (try the next one at once).
        """
        self._current = (self._current + 1) % len(self.urls)
        self._misses += 1
        return self._misses % len(self.urls) == 0


class Backoff:
    """Waits that double from ``first`` up to ``cap``, each drawn in [half, all] of that.

    Jittered so that processes that lost the broker together do not come back
    in lockstep; capped so that, once the broker is back, the longest anyone
    waits is ``cap``.
    """

    def __init__(
        self,
        cap: float = DEFAULT_MAX_BACKOFF_SECONDS,
        *,
        first: float = FIRST_BACKOFF_SECONDS,
        draw: Callable[[], float] = random.random,
    ) -> None:
        if cap <= 0 or first <= 0:
            raise ValueError("backoff waits must be positive")
        self.cap = cap
        self.first = min(first, cap)
        self._draw = draw
        self._ceiling = self.first

    def next(self) -> float:
        ceiling = self._ceiling
        self._ceiling = min(ceiling * 2, self.cap)
        return ceiling * (0.5 + 0.5 * self._draw())

    def reset(self) -> None:
        self._ceiling = self.first


async def connect(
    nodes: Nodes, role: str, *, timeout: float = CONNECT_TIMEOUT_SECONDS
) -> AbstractConnection:
    """A plain connection to the first node that answers, for processes that
    rebuild their own state when it is lost; raises BrokerUnavailable."""
    failures: list[str] = []
    for _ in range(len(nodes)):
        url = nodes.current
        try:
            connection = await aio_pika.connect(
                url,
                client_properties={"connection_name": connection_name(role)},
                timeout=timeout,
                connection_class=_Connection,
            )
        except CONNECTION_EXCEPTIONS as exc:
            failures.append(f"{redacted(url)}: {exc!r}")
            nodes.moved_on()
            continue
        nodes.connected()
        return connection
    raise BrokerUnavailable("no broker node answers (" + "; ".join(failures) + ")")


def _use_our_transport(connection: aio_pika.Connection, write_linger: float = 0.0) -> None:
    # Idempotent: frames read with less work, deliveries without a task where asked.
    frame_reader.install()
    delivery.install()
    # aio-pika hands its kwargs to aiormq.connect, but keeps only those it knows.
    factory = transport_for(connection.url, linger=write_linger)
    if factory is not None:
        connection.kwargs["transport_factory"] = factory


class _Connection(aio_pika.Connection):
    """A plain connection on ``broker.transport`` (a round's frames in one write)."""

    def __init__(self, url: URL, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        _use_our_transport(self)


class FailoverConnection(RobustConnection):
    """A robust connection that goes to the next node when it loses its own."""

    def __init__(
        self, nodes: Nodes, backoff: Backoff, *, write_linger: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(URL(nodes.current), **kwargs)
        _use_our_transport(self, write_linger)
        self._nodes = nodes
        self._position = nodes.position
        self._backoff = backoff
        self.reconnect_interval = 0.0

    @property
    def node(self) -> str:
        """The URL of the node it is connected (or connecting) to."""
        return str(self.url)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # The node was lost, or an attempt to reach it failed. Our own close
        # passes here too; moving on then is harmless.
        if not self._close_called:
            if self._position == self._nodes.position:
                wait = self._backoff.next() if self._nodes.moved_on() else 0.0
            else:
                # Another connection of the process moved on already: follow it.
                wait = 0.0
            lost = self.url
            self._position = self._nodes.position
            self.url = URL(self._nodes.current)
            self.reconnect_interval = wait
            log.info(
                "no connection to %s; next attempt on %s in %.2fs",
                redacted(lost),
                redacted(self.url),
                wait,
            )
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        if self.connection_attempt:
            # Connected again after a loss: let the queues the lost node led elect
            # new leaders before channels come back and publish (see SETTLE_SECONDS).
            await asyncio.sleep(SETTLE_SECONDS)
        await super()._on_connected()
        self._nodes.connected()
        self._backoff.reset()
        self.reconnect_interval = 0.0


async def connect_robust(
    nodes: Nodes,
    role: str,
    *,
    timeout: float = CONNECT_TIMEOUT_SECONDS,
    max_backoff: float = DEFAULT_MAX_BACKOFF_SECONDS,
    write_linger: float = 0.0,
) -> FailoverConnection:
    """A connection that reconnects by itself, to whichever node answers, and
    restores its channels; raises BrokerUnavailable if no node answers now.

    The name shows in the management UI and in ``rabbitmqctl list_connections``.
    A ``reconnect_interval`` in the URL's query replaces ``max_backoff``.
    ``write_linger``: how long its writes may wait for more to share a
    ``send()`` (``broker.transport``; 0: until the next event-loop round).
    """
    in_url = URL(nodes.current).query.get("reconnect_interval")
    if in_url is not None:
        max_backoff = float(in_url)
    failures: list[str] = []
    for _ in range(len(nodes)):
        url = nodes.current
        connection = FailoverConnection(
            nodes,
            Backoff(max_backoff),
            write_linger=write_linger,
            client_properties={"connection_name": connection_name(role)},
        )
        try:
            await connection.connect(timeout=timeout)
        except CONNECTION_EXCEPTIONS as exc:
            # The failed attempt has moved ``nodes`` on already.
            failures.append(f"{redacted(url)}: {exc!r}")
            await _close_quietly(connection)
            continue
        except BaseException:
            await _close_quietly(connection)
            raise
        return connection
    raise BrokerUnavailable("no broker node answers (" + "; ".join(failures) + ")")


async def _close_quietly(connection: AbstractConnection) -> None:
    try:
        await connection.close()
    except CONNECTION_EXCEPTIONS as exc:
        log.debug("closing a failed connection: %r", exc)


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff,
    retry_on: Callable[[Exception], bool] = lambda _exc: True,
    stop: asyncio.Event | None = None,
    attempts: int | None = None,
) -> T:
    """``attempt()`` until it succeeds, waiting ``backoff`` between failures.

    An exception ``retry_on`` refuses, or the one of the last of ``attempts``
    attempts, is raised. When ``stop`` is set (before an attempt, or while
    waiting), raises BrokerUnavailable.
    """
    made = 0
    while True:
        if stop is not None and stop.is_set():
            raise BrokerUnavailable(f"stopped before {what} succeeded")
        try:
            made += 1
            return await attempt()
        except Exception as exc:
            if not retry_on(exc) or (attempts is not None and made >= attempts):
                raise
            wait = backoff.next()
            log.warning("%s failed (%r); trying again in %.2fs", what, exc, wait)
        if stop is None:
            await asyncio.sleep(wait)
            continue
        try:
            async with asyncio.timeout(wait):
                await stop.wait()
        except TimeoutError:
            pass
