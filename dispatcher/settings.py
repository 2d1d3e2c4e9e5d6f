"""Dispatcher configuration, from ``POLOS_*`` environment variables."""

from __future__ import annotations

from fnmatch import fnmatchcase

from pydantic import Field, model_validator

from broker.settings import BrokerSettings
from dispatcher.lifecycle import Tunables
from observe import ObserveSettings
from schemas.registry import DEFAULT_CONCURRENCY_STRATEGY, ConcurrencyStrategy

# basic.qos prefetch_count is an AMQP short.
MAX_PREFETCH = 65535
MIN_LIMITED_WINDOW = 32


class Settings(BrokerSettings):
    dispatcher_queues: str = Field(
        default="*",
        description='Comma-separated fnmatch patterns over "<project>/<queue>" this '
        'dispatcher owns (with the others that match), e.g. "acme/*,beta/emails".',
    )
    default_concurrency_limit: int | None = Field(
        default=None, ge=1, description="Limit of a queue never given one; unset = unlimited"
    )
    dispatcher_unlimited_window: int = Field(
        default=1000,
        ge=1,
        le=MAX_PREFETCH,
        description="Prefetch of an unlimited queue: how many submissions are held in memory",
    )
    dispatcher_config_wait_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="How long a submission carrying a new limit or strategy waits for the "
        "registry event that records it before it is admitted under what the registry says "
        "(its delivery held meanwhile: less than the hold time)",
    )
    dispatcher_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long an execution a worker reported running is kept after its "
        "last heartbeat; then it is dispatched again (workers renew every third of it)",
    )
    dispatcher_hold_seconds: float = Field(
        default=20.0,
        gt=0,
        le=600,
        description="The longest a submission or ledger delivery is held unacknowledged "
        "(keep it well below the broker's consumer_timeout): then what it says is kept in "
        "the ledger instead",
    )
    dispatcher_ends_linger_seconds: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="How long the end of an execution (its ledger tombstone) may wait for "
        "the next ledger record, rather than a record of its own; the deliveries it settles "
        "stay held meanwhile (0: a record at once)",
    )
    dispatcher_cancel_queued_wait_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="How long a cancel request for an execution still queued in the broker "
        "waits for its submission to reach the head of the queue (then it ends cancelled "
        "without running); after that the request is dropped",
    )
    dispatcher_cancel_unknown_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long a cancel request for an execution this dispatcher does not "
        "know, and that was past queued when it was asked, waits for its submission (a "
        "takeover in progress) before it is dropped",
    )
    dispatcher_drain_timeout_seconds: float = Field(
        default=30.0, ge=0, description="SIGTERM: how long in-flight executions may take"
    )
    dispatcher_publish_channels: int = Field(default=2, ge=1, le=64)
    dispatcher_event_channels: int = Field(default=2, ge=1, le=64)
    dispatcher_event_linger_seconds: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="How long lifecycle events wait to share a message (0: the next "
        "event-loop round)",
    )
    dispatcher_event_batch_max: int = Field(
        default=1000, ge=1, description="Most lifecycle events in one message"
    )
    dispatcher_consumers_per_channel: int = Field(
        default=200, ge=1, description="Consumers sharing one AMQP channel"
    )
    dispatcher_declare_recorder_queue: bool = Field(
        default=True,
        description="Declare polos.recorder at start, so lifecycle events are kept for the "
        "recorder even before one runs; turn off when no execution store is wanted",
    )
    dispatcher_reconnect_max_seconds: float | None = Field(
        default=None, gt=0, description="Former name of POLOS_RECONNECT_INTERVAL_SECONDS"
    )
    dispatcher_status_interval_seconds: float = Field(
        default=2.0,
        ge=0,
        description="How often the dispatcher tells the operator page what it owns "
        "(polos.status); 0 = never",
    )
    observe: ObserveSettings = Field(default_factory=ObserveSettings)

    @model_validator(mode="after")
    def _config_wait_inside_hold(self) -> Settings:
        if (
            "dispatcher_config_wait_seconds" in self.model_fields_set
            and self.dispatcher_config_wait_seconds >= self.dispatcher_hold_seconds
        ):
            raise ValueError(
                "POLOS_DISPATCHER_CONFIG_WAIT_SECONDS must be less than "
                "POLOS_DISPATCHER_HOLD_SECONDS (a waiting submission's delivery is held)"
            )
        return self

    @model_validator(mode="after")
    def _former_reconnect(self) -> Settings:
        self._adopt_reconnect(self.dispatcher_reconnect_max_seconds)
        return self

    @property
    def config_wait_seconds(self) -> float:
        """The wait, inside the hold bound when only the hold was set (shorter)."""
        return min(self.dispatcher_config_wait_seconds, self.dispatcher_hold_seconds / 2)

    def tunables(self) -> Tunables:
        return Tunables(
            lease_seconds=self.dispatcher_lease_seconds,
            hold_seconds=self.dispatcher_hold_seconds,
            cancel_queued_wait_seconds=self.dispatcher_cancel_queued_wait_seconds,
            cancel_unknown_wait_seconds=self.dispatcher_cancel_unknown_wait_seconds,
            ends_linger_seconds=self.dispatcher_ends_linger_seconds,
        )

    def queue_patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.dispatcher_queues.split(",") if p.strip())

    def owns(self, project_id: str, queue_name: str) -> bool:
        name = f"{project_id}/{queue_name}"
        return any(fnmatchcase(name, pattern) for pattern in self.queue_patterns())

    def limit_for(self, configured: int | None) -> int | None:
        return configured if configured is not None else self.default_concurrency_limit

    def window_for(
        self, limit: int | None, strategy: ConcurrencyStrategy = DEFAULT_CONCURRENCY_STRATEGY
    ) -> int:
        """The prefetch of a submission consumer: what the lifecycle can choose from.

        Twice the limit leaves room to raise the limit without re-consuming. A
        partitioned queue runs up to the limit per key, so it looks as far ahead
        as an unlimited one: a busy key's backlog within the window never keeps
        another key's submissions from being seen (beyond it, it does).
        """
        if limit is None:
            return self.dispatcher_unlimited_window
        window = min(max(2 * limit, MIN_LIMITED_WINDOW), MAX_PREFETCH)
        if strategy == "partition":
            return max(window, self.dispatcher_unlimited_window)
        return window
