"""Registry events: the durable log (a RabbitMQ stream) of deployments and queues.

Worker fleets append ``deployment_registered``; gateways append
``queue_declared`` (first submission to a queue), ``queue_limit_set`` and
``queue_strategy_set`` (a submission carrying a different
``queue_concurrency_limit`` or ``concurrency_strategy``, or the operator's
``python -m gateway queues set``). Every gateway and dispatcher replays the log
from the start and follows it, so the log *is* the configuration: the latest
event wins. Readers also append a ``registry_snapshot`` (the whole state) once
the events since the last one outgrow ``REGISTRY_SNAPSHOT_EVERY_BYTES``, so the
stream's retention can drop what came before it. A reader skips an event it
cannot decode (an older process meeting a newer event type), so new event types
never break old readers.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from schemas.topology import DEPLOYMENT_ID_PATTERN, MAX_WORKFLOW_ID_LENGTH, PROJECT_ID_PATTERN

ConcurrencyStrategy = Literal["deduplicate", "partition", "cancel_in_progress"]
"""What a queue does with ``concurrency_key`` (DESIGN §3; README "Concurrency keys").

- ``deduplicate`` (the default): a submission whose key is held by an execution
  with a slot ends ``deduplicated`` when it reaches the head of the queue;
- ``partition``: the queue's limit applies per key (executions without a key
  share one partition of their own);
- ``cancel_in_progress``: a newer execution with a key cancels the older
  pending or running one with that key.
"""
CONCURRENCY_STRATEGIES: Final[tuple[ConcurrencyStrategy, ...]] = get_args(ConcurrencyStrategy)
DEFAULT_CONCURRENCY_STRATEGY: Final[ConcurrencyStrategy] = "deduplicate"


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    at: str = Field(description="RFC 3339 UTC time the event was written")


WorkflowId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_WORKFLOW_ID_LENGTH)]


class DeploymentRegistered(_Event):
    """Bounded names, so the deployment's work queue name (and every name derived
    from them) fits AMQP's 255-byte limit; an older, longer event is skipped on
    replay (it could never have been dispatched)."""

    type: Literal["deployment_registered"] = "deployment_registered"
    project_id: str = Field(pattern=PROJECT_ID_PATTERN)
    deployment_id: str = Field(pattern=DEPLOYMENT_ID_PATTERN)
    workflows: tuple[WorkflowId, ...]


class QueueDeclared(_Event):
    type: Literal["queue_declared"] = "queue_declared"
    project_id: str
    queue_name: str
    concurrency_limit: int | None = None
    concurrency_strategy: ConcurrencyStrategy | None = None


class QueueLimitSet(_Event):
    type: Literal["queue_limit_set"] = "queue_limit_set"
    project_id: str
    queue_name: str
    concurrency_limit: int


class QueueStrategySet(_Event):
    type: Literal["queue_strategy_set"] = "queue_strategy_set"
    project_id: str
    queue_name: str
    concurrency_strategy: ConcurrencyStrategy


class ReplayMarker(_Event):
    """Written by a reader on start; reading it back means the replay is complete."""

    type: Literal["replay_marker"] = "replay_marker"
    nonce: str


class SnapshotDeployment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    project_id: str
    deployment_id: str
    workflows: tuple[str, ...]


class SnapshotQueue(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    project_id: str
    queue_name: str
    concurrency_limit: int | None = None
    concurrency_strategy: ConcurrencyStrategy | None = None
    # The ids of the latest events about the queue, newest last (``has_heard``).
    event_ids: tuple[str, ...] = ()


class RegistrySnapshot(_Event):
    """The whole registry as one reader saw it through stream offset ``through``.

    Written so that the stream can drop its oldest segments (its retention):
    a reader that meets one takes it as its state and applies again what it
    read after ``through`` (events another process appended while the snapshot
    was on its way), so a snapshot never undoes a newer event.
    """

    type: Literal["registry_snapshot"] = "registry_snapshot"
    through: int = Field(ge=-1)
    deployments: tuple[SnapshotDeployment, ...] = ()
    latest: dict[str, str] = Field(default_factory=dict)
    queues: tuple[SnapshotQueue, ...] = ()


RegistryEvent = Annotated[
    DeploymentRegistered
    | QueueDeclared
    | QueueLimitSet
    | QueueStrategySet
    | ReplayMarker
    | RegistrySnapshot,
    Field(discriminator="type"),
]
QueueEvent = QueueDeclared | QueueLimitSet | QueueStrategySet
"""The events that configure a queue (a dispatcher applies them to its owner)."""
REGISTRY_EVENT: TypeAdapter[RegistryEvent] = TypeAdapter(RegistryEvent)


def encode_event(event: RegistryEvent) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


# Every member of the ``RegistryEvent`` union, by its ``type`` tag.
REGISTRY_EVENT_TYPES: Final[frozenset[str]] = frozenset(
    model.model_fields["type"].default for model in get_args(get_args(RegistryEvent)[0])
)


def decode_event(raw: bytes) -> RegistryEvent:
    return REGISTRY_EVENT.validate_json(raw)


def event_type_known(raw: bytes) -> bool:
    """Whether an undecodable event is of a type this release knows (an invalid
    one, skipped by every release) rather than a newer release's."""
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(decoded, dict) or decoded.get("type") in REGISTRY_EVENT_TYPES
