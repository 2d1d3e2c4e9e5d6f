"""The registry stream: append events, replay and follow them into a ``RegistryState``.

Every reader replays the stream from its first offset. To know when the replay
is complete, a reader appends a ``replay_marker`` with a fresh nonce before it
starts consuming; reading its own marker back means it has seen everything
written before it started.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError

from broker.connection import Nodes, connect
from broker.publisher import ConfirmedPublisher
from broker.topology import declare_queue
from schemas.ids import now_rfc3339
from schemas.registry import (
    ConcurrencyStrategy,
    DeploymentRegistered,
    QueueDeclared,
    QueueLimitSet,
    QueueStrategySet,
    RegistryEvent,
    ReplayMarker,
    decode_event,
    encode_event,
)
from schemas.topology import REGISTRY_STREAM, REGISTRY_STREAM_ARGUMENTS, replicated

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deployment:
    deployment_id: str
    workflows: frozenset[str]


@dataclass(slots=True)
class QueueConfig:
    project_id: str
    queue_name: str
    concurrency_limit: int | None = None
    concurrency_strategy: ConcurrencyStrategy | None = None  # None: never set (deduplicate)


@dataclass(slots=True)
class RegistryState:
    """What the registry says now. The latest event wins; replays are idempotent."""

    deployments: dict[tuple[str, str], Deployment] = field(default_factory=dict)
    latest: dict[str, str] = field(default_factory=dict)
    queues: dict[tuple[str, str], QueueConfig] = field(default_factory=dict)

    def apply(self, event: RegistryEvent) -> None:
        if isinstance(event, DeploymentRegistered):
            key = (event.project_id, event.deployment_id)
            known = self.deployments.get(key)
            if known is None:
                # "Latest" is the most recently *first* registered deployment: an
                # old fleet restarting must not take the default back.
                self.latest[event.project_id] = event.deployment_id
                workflows = frozenset(event.workflows)
            else:
                workflows = known.workflows | frozenset(event.workflows)
            self.deployments[key] = Deployment(event.deployment_id, workflows)
        elif isinstance(event, QueueDeclared):
            key = (event.project_id, event.queue_name)
            config = self.queues.setdefault(key, QueueConfig(event.project_id, event.queue_name))
            if event.concurrency_limit is not None:
                config.concurrency_limit = event.concurrency_limit
            if event.concurrency_strategy is not None:
                config.concurrency_strategy = event.concurrency_strategy
        elif isinstance(event, QueueLimitSet):
            key = (event.project_id, event.queue_name)
            config = self.queues.setdefault(key, QueueConfig(event.project_id, event.queue_name))
            config.concurrency_limit = event.concurrency_limit
        elif isinstance(event, QueueStrategySet):
            key = (event.project_id, event.queue_name)
            config = self.queues.setdefault(key, QueueConfig(event.project_id, event.queue_name))
            config.concurrency_strategy = event.concurrency_strategy

    def resolve(self, project_id: str, deployment_id: str | None) -> Deployment | None:
        """The named deployment of a project, or its latest when none is named."""
        if deployment_id is None:
            deployment_id = self.latest.get(project_id)
            if deployment_id is None:
                return None
        return self.deployments.get((project_id, deployment_id))


async def declare_registry(connection: AbstractConnection, *, replicas: int | None = None) -> None:
    await declare_queue(
        connection, REGISTRY_STREAM, replicated(REGISTRY_STREAM_ARGUMENTS, replicas)
    )


class RegistryWriter:
    """Appends events to the stream with a publisher confirm."""

    def __init__(self, publisher: ConfirmedPublisher) -> None:
        self._publisher = publisher

    async def append(self, event: RegistryEvent) -> None:
        await self._publisher.publish(
            REGISTRY_STREAM, encode_event(event), message_id=uuid.uuid4().hex
        )

    async def register_deployment(
        self, project_id: str, deployment_id: str, workflows: Iterable[str]
    ) -> None:
        await self.append(
            DeploymentRegistered(
                at=now_rfc3339(),
                project_id=project_id,
                deployment_id=deployment_id,
                workflows=tuple(workflows),
            )
        )


async def register_deployment(
    amqp_url: str,
    project_id: str,
    deployment_id: str,
    workflows: Iterable[str],
    *,
    replicas: int | None = None,
) -> None:
    """Record a deployment and its workflows (what a worker fleet does on start).

    ``amqp_url``: one URL or a comma-separated list (the first node that answers).
    """
    connection = await connect(Nodes.parse(amqp_url), "registry-client")
    try:
        await declare_registry(connection, replicas=replicas)
        publisher = ConfirmedPublisher(connection, confirm_timeout=10.0, channels=1)
        await publisher.start()
        await RegistryWriter(publisher).register_deployment(project_id, deployment_id, workflows)
    finally:
        await connection.close()


Listener = Callable[[RegistryEvent], None]


class RegistryFollower:
    """Replays the stream into ``state`` and follows it live.

    ``replayed`` is set once everything written before ``start()`` was applied.
    Listeners are called after each event is applied (dispatchers use this to
    discover queues and limit changes).
    """

    PREFETCH = 1000

    def __init__(
        self,
        connection: AbstractConnection,
        writer: RegistryWriter,
        state: RegistryState,
        *,
        replicas: int | None = None,
    ) -> None:
        self._connection = connection
        self._replicas = replicas
        self._writer = writer
        self.state = state
        self.replayed = asyncio.Event()
        self._listeners: list[Listener] = []
        self._nonce = uuid.uuid4().hex
        self._last_offset = -1
        self._channel: AbstractChannel | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        await declare_registry(self._connection, replicas=self._replicas)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self.PREFETCH)
        queue = await self._channel.declare_queue(REGISTRY_STREAM, passive=True)
        await self._writer.append(ReplayMarker(at=now_rfc3339(), nonce=self._nonce))
        await queue.consume(self._on_message, arguments={"x-stream-offset": "first"})

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A stream ack only grants credit; nothing is removed.
        await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            if offset <= self._last_offset:
                return  # replayed again after a reconnect: already applied
            self._last_offset = offset
        try:
            event = decode_event(message.body)
        except ValidationError:
            log.warning("skipping undecodable registry event at offset %s", offset)
            return
        if isinstance(event, ReplayMarker):
            if event.nonce == self._nonce:
                self.replayed.set()
            return
        self.state.apply(event)
        for listener in self._listeners:
            listener(event)
