"""Recorder configuration, from ``POLOS_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from broker.settings import BrokerSettings
from observe import ObserveSettings
from schemas.topology import RECORDER_BINDING_KEY, RECORDER_QUEUE
from store import DEFAULT_RETENTION_SECONDS


class RecorderSettings(BrokerSettings):
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_timeout_seconds: float = Field(default=2.0, gt=0)
    redis_key_prefix: str = "polos:"
    retention_seconds: int = Field(
        default=DEFAULT_RETENTION_SECONDS, ge=1, description="How long a record is kept"
    )
    recorder_queue: str = Field(
        default=RECORDER_QUEUE, description="Every recorder of a deployment shares it"
    )
    recorder_binding_key: str = Field(
        default=RECORDER_BINDING_KEY, description="Which events (topic pattern) it records"
    )
    recorder_prefetch: int = Field(default=1000, ge=1, le=65535)
    recorder_batch_size: int = Field(default=200, ge=1)
    recorder_batch_wait_seconds: float = Field(
        default=0.005, ge=0, description="How long a partial batch waits for more events"
    )
    recorder_retry_initial_seconds: float = Field(default=0.1, gt=0)
    recorder_retry_max_seconds: float = Field(default=5.0, gt=0)
    shutdown_timeout_seconds: float = Field(default=10.0, ge=0)
    observe: ObserveSettings = Field(default_factory=ObserveSettings)

    @model_validator(mode="after")
    def _batch_within_prefetch(self) -> RecorderSettings:
        if self.recorder_batch_size > self.recorder_prefetch:
            raise ValueError("recorder_batch_size exceeds recorder_prefetch")
        return self
