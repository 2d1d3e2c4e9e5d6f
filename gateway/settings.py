"""Gateway configuration, from ``POLOS_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from broker.settings import BrokerSettings
from observe import ObserveSettings
from schemas.api import DEFAULT_RUN_TIMEOUT_SECONDS
from schemas.limits import MAX_BODY_BYTES_CAP
from schemas.topology import MAX_RUN_TIMEOUT_CAP_S
from store import DEFAULT_MAX_CONNECTIONS, DEFAULT_POOL_TIMEOUT_SECONDS


class Settings(BrokerSettings):
    host: str = "127.0.0.1"
    port: int = 8080
    projects_file: Path = Field(
        default=Path("polos-projects.json"),
        description="Projects and their API key hashes; reloaded on SIGHUP.",
    )
    # At most what one broker message carries once stamped (schemas.limits).
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, le=MAX_BODY_BYTES_CAP)
    # -- what one connection may hold, and for how long (gateway/server.py) ---------------
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, description="Request line and header fields, in all"
    )
    max_header_line_bytes: int = Field(
        default=8190, ge=256, description="The request line, and each header field"
    )
    max_header_count: int = Field(default=64, ge=8, description="Header fields per request")
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="From a request's first byte to the end of its headers"
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, description="From the end of the headers to the end of the body"
    )
    keepalive_timeout_seconds: float = Field(
        default=75.0, gt=0, description="An idle connection (or a new one, before its first byte)"
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Open connections per process; unset: the open-files limit less 128 "
        "(room for the broker, Redis and files)",
    )
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
    redis_max_connections: int = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        ge=1,
        description="Connections to the execution store at most; further reads wait for one",
    )
    redis_pool_timeout_seconds: float = Field(
        default=DEFAULT_POOL_TIMEOUT_SECONDS,
        gt=0,
        description="How long a read waits for a free store connection before it answers 503",
    )
    publish_queued_events: bool = Field(
        default=True,
        description="Publish a queued lifecycle event once a submission is confirmed, so its "
        "record exists from then on (not awaited; never fails a submission)",
    )
    queued_event_linger_seconds: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="How long the queued events of a loop round wait for more to share "
        "their message (0: sent on the next loop round)",
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
    observe: ObserveSettings = Field(default_factory=ObserveSettings)
    # -- idempotency keys (kept in the execution store's Redis) --------------------------
    idempotency_retention_seconds: int = Field(
        default=24 * 3600, ge=1, description="How long a key answers with its execution"
    )
    idempotency_wait_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A request whose key another request is still publishing waits this long "
        "for its answer before it answers 409",
    )
    idempotency_lease_seconds: float | None = Field(
        default=None,
        gt=0,
        description="How long a key's holder is presumed alive while it publishes; default "
        "the longest a publish can take (two confirm timeouts, two Redis timeouts, 1 s)",
    )

    @property
    def idempotency_lease(self) -> float:
        if self.idempotency_lease_seconds is not None:
            return self.idempotency_lease_seconds
        return 2 * self.confirm_timeout_seconds + 2 * self.redis_timeout_seconds + 1.0

    @model_validator(mode="after")
    def _default_within_max(self) -> Settings:
        if self.default_run_timeout_seconds > self.max_run_timeout_seconds:
            raise ValueError("default_run_timeout_seconds exceeds max_run_timeout_seconds")
        return self
