"""Worker configuration, from ``POLOS_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, model_validator

from broker.settings import BrokerSettings
from observe import ObserveSettings


class WorkerSettings(BrokerSettings):
    worker_concurrency: int = Field(
        default=16, ge=1, le=10_000, description="executions run at once (the prefetch)"
    )
    worker_drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="SIGTERM: how long running executions may take before they are handed back",
    )
    worker_running_delay_seconds: float = Field(
        default=0.05,
        ge=0,
        description="an execution still running this long after it started is reported "
        "(in a heartbeat) and its work acknowledged; shorter runs are never reported running",
    )
    worker_hold_seconds: float = Field(
        default=20.0,
        gt=0,
        description="the longest a delivery waits here for a free slot; after half of it the "
        "waiting ones are handed back to the queue",
    )
    worker_write_linger_seconds: float = Field(
        default=0.001,
        ge=0,
        le=0.1,
        description="how long the worker's writes to the broker (results, acknowledgements, "
        "heartbeats) may wait for more to share one socket write; 0: until the next "
        "event-loop round",
    )
    worker_reconnect_interval_seconds: float | None = Field(
        default=None, gt=0, description="Former name of POLOS_RECONNECT_INTERVAL_SECONDS"
    )
    observe: ObserveSettings = Field(default_factory=ObserveSettings)

    @model_validator(mode="after")
    def _former_reconnect(self) -> WorkerSettings:
        self._adopt_reconnect(self.worker_reconnect_interval_seconds)
        return self
