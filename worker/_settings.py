"""Worker configuration, from ``POLOS_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, model_validator

from broker.settings import BrokerSettings


class WorkerSettings(BrokerSettings):
    worker_concurrency: int = Field(
        default=16, ge=1, le=10_000, description="executions run at once (the prefetch)"
    )
    worker_drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="SIGTERM: how long running executions may take before they are handed back",
    )
    worker_reconnect_interval_seconds: float | None = Field(
        default=None, gt=0, description="Former name of POLOS_RECONNECT_INTERVAL_SECONDS"
    )

    @model_validator(mode="after")
    def _former_reconnect(self) -> WorkerSettings:
        self._adopt_reconnect(self.worker_reconnect_interval_seconds)
        return self
