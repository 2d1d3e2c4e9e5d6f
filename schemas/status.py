"""What each dispatcher tells the operator page, every few seconds, on ``polos.status``.

    dispatcher ──DispatcherStatus (transient, expires)──► polos.status (fanout)
        ──► one exclusive queue per gateway process ──► the operator page

Only the gateway's page reads it; nothing decides anything on it. A status
older than three of its intervals means that dispatcher is gone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STATUS_EXCHANGE = "polos.status"
# A page shows at most this many queues per dispatcher (the busiest first).
MAX_STATUS_QUEUES = 1000


class QueueStatus(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    project_id: str
    queue_name: str
    limit: int | None = Field(description="The concurrency limit; None = unlimited")
    holding: int = Field(description="Executions holding a slot now")
    waiting: int = Field(
        default=0,
        description="Submissions delivered to the owner (its prefetch) and not admitted yet: "
        "queued, though the broker counts them as unacknowledged, not ready",
    )
    counts: dict[str, int] = Field(
        default_factory=dict,
        description="Lifecycle transitions by status since this dispatcher began to own it "
        "(differences between two statuses give the rates)",
    )


class DispatcherStatus(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["dispatcher_status"] = "dispatcher_status"
    dispatcher_id: str = Field(description="<host>-<pid>-<random>, stable for the process")
    at: float = Field(description="Unix seconds")
    interval_seconds: float
    ready: bool
    sessions: int
    standby: int = Field(description="Queues it consumes as a standby (another one owns them)")
    queues: list[QueueStatus] = Field(description="The queues it owns (at most MAX_STATUS_QUEUES)")
    truncated: int = Field(default=0, description="Owned queues left out of ``queues``")


def encode_status(status: DispatcherStatus) -> bytes:
    return status.model_dump_json().encode()


def decode_status(raw: bytes) -> DispatcherStatus:
    return DispatcherStatus.model_validate_json(raw)
