"""Connecting to RabbitMQ: named connections, robust where a process must recover."""

from __future__ import annotations

import socket

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from yarl import URL


def connection_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}"


def with_reconnect_interval(url: str, seconds: float | None) -> str:
    """``url`` with aio-pika's ``reconnect_interval``, unless the URL sets one.

    aio-pika's robust connection retries every 5 s by default: after the broker
    came back, a process would go on failing for up to 5 s.
    """
    parsed = URL(url)
    if seconds is None or "reconnect_interval" in parsed.query:
        return url
    return str(parsed.update_query(reconnect_interval=str(seconds)))


async def connect_robust(
    url: str, role: str, *, timeout: float = 10.0, reconnect_interval: float | None = None
) -> AbstractRobustConnection:
    """A connection that reconnects (every ``reconnect_interval`` seconds, unless the
    URL says otherwise) and restores its channels by itself.

    The name shows in the management UI and in ``rabbitmqctl list_connections``.
    """
    return await aio_pika.connect_robust(
        with_reconnect_interval(url, reconnect_interval),
        client_properties={"connection_name": connection_name(role)},
        timeout=timeout,
    )


async def connect(url: str, role: str, *, timeout: float = 10.0) -> AbstractConnection:
    """A plain connection, for processes that rebuild their own state on loss."""
    return await aio_pika.connect(
        url, client_properties={"connection_name": connection_name(role)}, timeout=timeout
    )
