"""The registry stream: append events, replay and follow them into a ``RegistryState``.

Every reader replays the stream from its first offset. To know when the replay
is complete, a reader appends a ``replay_marker`` with a fresh nonce before it
starts consuming; reading its own marker back means it has seen everything
written before it started.

The stream keeps a bounded number of bytes (its retention drops the oldest
segments). So that nothing is forgotten with them, a reader that has replayed
appends a ``registry_snapshot`` of its whole state once the events since the
last snapshot outgrow a threshold well inside the retention: what the stream
keeps always starts before a snapshot. A reader takes every snapshot it meets
as its state and applies again what it read after the snapshot's ``through``
offset (``RegistryLog``), which is what it had anyway if it saw the whole
history, and the history it missed if the retention dropped it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

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
    RegistrySnapshot,
    ReplayMarker,
    SnapshotDeployment,
    SnapshotQueue,
    decode_event,
    encode_event,
    event_type_known,
)
from schemas.topology import (
    REGISTRY_SNAPSHOT_EVERY_BYTES,
    REGISTRY_STREAM,
    REGISTRY_STREAM_ARGUMENTS,
    replicated,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deployment:
    deployment_id: str
    workflows: frozenset[str]


# How many of a queue's latest registry event ids a reader remembers (``has_heard``),
# and how many a snapshot carries (each costs a snapshot ~35 bytes per queue).
CONFIG_IDS_KEPT = 16
CONFIG_IDS_IN_SNAPSHOT = 4


@dataclass(slots=True)
class QueueConfig:
    project_id: str
    queue_name: str
    concurrency_limit: int | None = None
    concurrency_strategy: ConcurrencyStrategy | None = None  # None: never set (deduplicate)
    # The ids (AMQP message ids) of the latest events about the queue, newest last:
    # a submission names the one that set what it carries (``queue_config_id``),
    # and its dispatcher admits it once it has read that event (DESIGN §3).
    event_ids: tuple[str, ...] = ()

    def heard(self, event_id: str | None) -> None:
        if event_id is None:
            return
        ids = (*(i for i in self.event_ids if i != event_id), event_id)
        self.event_ids = ids[-CONFIG_IDS_KEPT:]

    @property
    def latest_event_id(self) -> str | None:
        return self.event_ids[-1] if self.event_ids else None

    def same_config(self, other: QueueConfig | None) -> bool:
        return (
            other is not None
            and self.concurrency_limit == other.concurrency_limit
            and self.concurrency_strategy == other.concurrency_strategy
        )


@dataclass(slots=True)
class RegistryState:
    """What the registry says now. The latest event wins; replays are idempotent."""

    deployments: dict[tuple[str, str], Deployment] = field(default_factory=dict)
    latest: dict[str, str] = field(default_factory=dict)
    queues: dict[tuple[str, str], QueueConfig] = field(default_factory=dict)

    def apply(self, event: RegistryEvent, event_id: str | None = None) -> None:
        """``event_id``: the event's message id, remembered for a queue's events."""
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
            config.heard(event_id)
        elif isinstance(event, QueueLimitSet):
            key = (event.project_id, event.queue_name)
            config = self.queues.setdefault(key, QueueConfig(event.project_id, event.queue_name))
            config.concurrency_limit = event.concurrency_limit
            config.heard(event_id)
        elif isinstance(event, QueueStrategySet):
            key = (event.project_id, event.queue_name)
            config = self.queues.setdefault(key, QueueConfig(event.project_id, event.queue_name))
            config.concurrency_strategy = event.concurrency_strategy
            config.heard(event_id)

    def has_heard(self, project_id: str, queue_name: str, event_id: str) -> bool:
        """Whether the queue's event ``event_id`` was read (among its latest ones)."""
        config = self.queues.get((project_id, queue_name))
        return config is not None and event_id in config.event_ids

    def snapshot(self, through: int) -> RegistrySnapshot:
        """The whole state as an event: what every event up to ``through`` made it."""
        return RegistrySnapshot(
            at=now_rfc3339(),
            through=through,
            deployments=tuple(
                SnapshotDeployment(
                    project_id=project_id,
                    deployment_id=deployment.deployment_id,
                    workflows=tuple(sorted(deployment.workflows)),
                )
                for (project_id, _), deployment in self.deployments.items()
            ),
            latest=dict(self.latest),
            queues=tuple(
                SnapshotQueue(
                    project_id=config.project_id,
                    queue_name=config.queue_name,
                    concurrency_limit=config.concurrency_limit,
                    concurrency_strategy=config.concurrency_strategy,
                    event_ids=config.event_ids[-CONFIG_IDS_IN_SNAPSHOT:],
                )
                for config in self.queues.values()
            ),
        )

    def restore(self, snapshot: RegistrySnapshot) -> None:
        """Become what the snapshot says, in place (others hold this object)."""
        self.deployments.clear()
        self.latest.clear()
        self.queues.clear()
        for deployment in snapshot.deployments:
            self.deployments[(deployment.project_id, deployment.deployment_id)] = Deployment(
                deployment.deployment_id, frozenset(deployment.workflows)
            )
        self.latest.update(snapshot.latest)
        for queue in snapshot.queues:
            self.queues[(queue.project_id, queue.queue_name)] = QueueConfig(
                queue.project_id,
                queue.queue_name,
                queue.concurrency_limit,
                queue.concurrency_strategy,
                queue.event_ids,
            )

    def resolve(self, project_id: str, deployment_id: str | None) -> Deployment | None:
        """The named deployment of a project, or its latest when none is named."""
        if deployment_id is None:
            deployment_id = self.latest.get(project_id)
            if deployment_id is None:
                return None
        return self.deployments.get((project_id, deployment_id))


class RegistryLog:
    """What a reader makes of each event it reads, in stream order. No I/O.

    ``read`` applies an event to ``state`` and returns what listeners should
    hear of it. A snapshot replaces the state, then the events read after its
    ``through`` offset (kept, the last ``recent`` of them) are applied again; the
    listeners hear of each queue whose configuration that changed.
    ``since_snapshot`` counts the bytes read since the last snapshot.
    ``blind``: since the last snapshot an event of a type this release does not
    know went by (a newer release's); a snapshot of this state would drop what
    it said, so none is written until a snapshot (a newer reader's) covers it.
    """

    def __init__(self, state: RegistryState, *, recent: int = 4096) -> None:
        self.state = state
        self.first_offset: int | None = None  # where the retained stream began
        self.last_offset = -1
        self.since_snapshot = 0
        self.blind = False
        self._recent: deque[tuple[int, RegistryEvent, str | None]] = deque(maxlen=recent)

    def read(
        self, offset: int | None, event: RegistryEvent, size: int, event_id: str | None = None
    ) -> list[RegistryEvent]:
        if not self._advance(offset):
            return []  # read again after a reconnect: already applied
        if isinstance(event, RegistrySnapshot):
            self.since_snapshot = 0
            self.blind = False
            return self._restore(event)
        self.since_snapshot += size
        if isinstance(event, ReplayMarker):
            return [event]
        if offset is not None:
            self._recent.append((offset, event, event_id))
        self.state.apply(event, event_id)
        return [event]

    def unreadable(self, offset: int | None, raw: bytes) -> None:
        """An event that does not decode: skipped, counted, remembered if newer."""
        if self._advance(offset):
            self.since_snapshot += len(raw)
            if not event_type_known(raw):
                self.blind = True

    def _advance(self, offset: int | None) -> bool:
        if offset is None:
            return True
        if offset <= self.last_offset:
            return False
        if self.first_offset is None:
            self.first_offset = offset
        self.last_offset = offset
        return True

    def _restore(self, snapshot: RegistrySnapshot) -> list[RegistryEvent]:
        before = {key: replace(config) for key, config in self.state.queues.items()}
        self.state.restore(snapshot)
        for offset, event, event_id in self._recent:
            if offset > snapshot.through:
                self.state.apply(event, event_id)
        return [
            QueueDeclared(
                at=snapshot.at,
                project_id=config.project_id,
                queue_name=config.queue_name,
                concurrency_limit=config.concurrency_limit,
                concurrency_strategy=config.concurrency_strategy,
            )
            for key, config in self.state.queues.items()
            if not config.same_config(before.get(key))
        ]


async def declare_registry(
    connection: AbstractConnection,
    *,
    replicas: int | None = None,
    stream: str = REGISTRY_STREAM,
    arguments: dict[str, Any] | None = None,
) -> None:
    await declare_queue(
        connection, stream, replicated(arguments or REGISTRY_STREAM_ARGUMENTS, replicas)
    )


class RegistryWriter:
    """Appends events to the stream with a publisher confirm."""

    def __init__(self, publisher: ConfirmedPublisher, *, stream: str = REGISTRY_STREAM) -> None:
        self._publisher = publisher
        self.stream = stream

    async def append(self, event: RegistryEvent, *, event_id: str | None = None) -> str:
        """Append with a confirm; returns the event's id (its message id)."""
        event_id = event_id or uuid.uuid4().hex
        await self._publisher.publish(self.stream, encode_event(event), message_id=event_id)
        return event_id

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
    discover queues and limit changes). Once replayed, the follower appends a
    snapshot when the stream has grown ``snapshot_every_bytes`` since the last
    one (after a random pause of up to ``snapshot_jitter`` seconds, so that of
    many followers usually one writes it; a second is harmless).
    """

    PREFETCH = 1000

    def __init__(
        self,
        connection: AbstractConnection,
        writer: RegistryWriter,
        state: RegistryState,
        *,
        replicas: int | None = None,
        arguments: dict[str, Any] | None = None,
        snapshot_every_bytes: int = REGISTRY_SNAPSHOT_EVERY_BYTES,
        snapshot_jitter: float = 2.0,
    ) -> None:
        self._connection = connection
        self._replicas = replicas
        self._arguments = arguments
        self._writer = writer
        self.state = state
        self.log = RegistryLog(state)
        self.replayed = asyncio.Event()
        self._listeners: list[Listener] = []
        self._nonce = uuid.uuid4().hex
        self._channel: AbstractChannel | None = None
        self._snapshot_every = snapshot_every_bytes
        self._snapshot_jitter = snapshot_jitter
        self._snapshotting: asyncio.Task[None] | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        stream = self._writer.stream
        await declare_registry(
            self._connection, replicas=self._replicas, stream=stream, arguments=self._arguments
        )
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self.PREFETCH)
        queue = await self._channel.declare_queue(stream, passive=True)
        await self._writer.append(ReplayMarker(at=now_rfc3339(), nonce=self._nonce))
        await queue.consume(self._on_message, arguments={"x-stream-offset": "first"})

    async def close(self) -> None:
        if self._snapshotting is not None:
            self._snapshotting.cancel()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A stream ack only grants credit; nothing is removed.
        await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if not isinstance(offset, int):
            offset = None
        try:
            event = decode_event(message.body)
        except ValidationError:
            self.log.unreadable(offset, message.body)
            log.warning("skipping undecodable registry event at offset %s", offset)
            return
        for heard in self.log.read(offset, event, len(message.body), message.message_id):
            if isinstance(heard, ReplayMarker):
                if heard.nonce == self._nonce and not self.replayed.is_set():
                    log.info("registry replayed from offset %s", self.log.first_offset)
                    self.replayed.set()
                continue
            for listener in self._listeners:
                listener(heard)
        self._maybe_snapshot()

    def _maybe_snapshot(self) -> None:
        if (
            self.replayed.is_set()
            and not self.log.blind
            and self.log.since_snapshot >= self._snapshot_every
            and self._snapshotting is None
        ):
            self._snapshotting = asyncio.create_task(self._snapshot())

    async def _snapshot(self) -> None:
        try:
            await asyncio.sleep(random.uniform(0, self._snapshot_jitter))
            if self.log.since_snapshot < self._snapshot_every or self.log.blind:
                return  # another follower wrote one meanwhile
            snapshot = self.state.snapshot(self.log.last_offset)
            await self._writer.append(snapshot)
            log.info(
                "registry snapshot through offset %d: %d deployments, %d queues",
                snapshot.through,
                len(snapshot.deployments),
                len(snapshot.queues),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker's: the next event tries again
            log.warning("cannot append a registry snapshot: %r", exc)
        finally:
            self._snapshotting = None
