"""Registry events: the durable log (a RabbitMQ stream) of deployments and queues.

Worker fleets append ``deployment_registered``; gateways append
``queue_declared`` (first submission to a queue) and ``queue_limit_set`` (a
submission carrying a different ``queue_concurrency_limit``). Every gateway and
dispatcher replays the log from the start and follows it, so the log *is* the
configuration: the latest event wins.
"""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from schemas.topology import DEPLOYMENT_ID_PATTERN, MAX_WORKFLOW_ID_LENGTH, PROJECT_ID_PATTERN


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


class QueueLimitSet(_Event):
    type: Literal["queue_limit_set"] = "queue_limit_set"
    project_id: str
    queue_name: str
    concurrency_limit: int


class ReplayMarker(_Event):
    """Written by a reader on start; reading it back means the replay is complete."""

    type: Literal["replay_marker"] = "replay_marker"
    nonce: str


RegistryEvent = Annotated[
    DeploymentRegistered | QueueDeclared | QueueLimitSet | ReplayMarker,
    Field(discriminator="type"),
]
REGISTRY_EVENT: TypeAdapter[RegistryEvent] = TypeAdapter(RegistryEvent)


def encode_event(event: RegistryEvent) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def decode_event(raw: bytes) -> RegistryEvent:
    return REGISTRY_EVENT.validate_json(raw)
