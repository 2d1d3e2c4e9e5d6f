"""Gateway configuration, from ``POLOS_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from broker.settings import BrokerSettings
from schemas.api import DEFAULT_RUN_TIMEOUT_SECONDS
from schemas.topology import MAX_RUN_TIMEOUT_CAP_S


class Settings(BrokerSettings):
    host: str = "127.0.0.1"
    port: int = 8080
    projects_file: Path = Field(
        default=Path("polos-projects.json"),
        description="Projects and their API key hashes; reloaded on SIGHUP.",
    )
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    default_run_timeout_seconds: int = Field(default=DEFAULT_RUN_TIMEOUT_SECONDS, ge=1)
    max_run_timeout_seconds: int = Field(default=24 * 3600, ge=1, le=MAX_RUN_TIMEOUT_CAP_S)
    queue_max_length: int = Field(
        default=1_000_000, ge=1, description="x-max-length of new submission queues"
    )
    retry_after_seconds: int = Field(default=1, ge=1)
    publish_channels: int = Field(default=2, ge=1, le=64)
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0)
    # -- the execution API (status, cancel, live events, batch) --------------------------
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="The execution store the status endpoints read",
    )
    redis_key_prefix: str = "polos:"
    redis_timeout_seconds: float = Field(default=2.0, gt=0)
    publish_queued_events: bool = Field(
        default=True,
        description="Publish a queued lifecycle event once a submission is confirmed, so its "
        "record exists from then on (not awaited; never fails a submission)",
    )
    record_wait_seconds: float = Field(
        default=1.0,
        ge=0,
        description="A status read of an execution minted moments ago that is not recorded "
        "yet looks again for this long before answering 404",
    )
    max_batch_items: int = Field(default=1000, ge=1, description="Workflows per batch_run")
    cancel_wait_seconds: float = Field(
        default=2.0,
        ge=0,
        description="How long a cancel waits for the record to say cancelled before it "
        "answers 202 with the status it has",
    )
    sse_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="Comment lines on an idle event stream"
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Settings:
        if self.default_run_timeout_seconds > self.max_run_timeout_seconds:
            raise ValueError("default_run_timeout_seconds exceeds max_run_timeout_seconds")
        return self
