"""Connecting to RabbitMQ: named connections, robust where a process must recover."""

from __future__ import annotations

import socket

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection


def connection_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}"


async def connect_robust(url: str, role: str, *, timeout: float = 10.0) -> AbstractRobustConnection:
    """A connection that reconnects and restores its channels by itself.

    The name shows in the management UI and in ``rabbitmqctl list_connections``.
    """
    return await aio_pika.connect_robust(
        url, client_properties={"connection_name": connection_name(role)}, timeout=timeout
    )


async def connect(url: str, role: str, *, timeout: float = 10.0) -> AbstractConnection:
    """A plain connection, for processes that rebuild their own state on loss."""
    return await aio_pika.connect(
        url, client_properties={"connection_name": connection_name(role)}, timeout=timeout
    )
