"""What every process needs to reach the broker, from ``POLOS_*`` environment variables.

Gateway, dispatcher, worker and recorder settings derive from ``BrokerSettings`` (and
so does the one setting they share that is not the broker's: the event loop).
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.connection import DEFAULT_MAX_BACKOFF_SECONDS, Backoff, Nodes, parse_urls
from observe.runtime import EventLoop

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class BrokerSettings(BaseSettings):
    # A URL refused at start must not print its password in the error.
    model_config = SettingsConfigDict(
        env_prefix="POLOS_", extra="ignore", hide_input_in_errors=True
    )

    amqp_url: SecretStr = Field(
        default=SecretStr(DEFAULT_AMQP_URL),
        description="The broker: one amqp URL, or every node of a cluster as a "
        "comma-separated list of URLs",
    )
    confirm_timeout_seconds: float = Field(default=5.0, gt=0)
    reconnect_interval_seconds: float = Field(
        default=DEFAULT_MAX_BACKOFF_SECONDS,
        gt=0,
        description="The longest wait between attempts to reach the broker: waits start at "
        "0.1 s and double (jittered) up to this; a lost node is followed by the next one at once",
    )
    quorum_group_size: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of every quorum queue and of the registry stream when they are "
        "first declared; unset = the broker's default (quorum queues: 3, or every node of a "
        "smaller cluster). Every process of a deployment must be given the same value",
    )

    event_loop: EventLoop = Field(
        default="auto",
        description="The event loop a gateway, dispatcher, worker or recorder process runs on "
        "(python -m ...): auto = uvloop where it is installed (it is a dependency on Linux "
        "and macOS), else asyncio's own",
    )

    @field_validator("amqp_url")
    @classmethod
    def _urls(cls, value: SecretStr) -> SecretStr:
        parse_urls(value.get_secret_value())
        return value

    def _adopt_reconnect(self, legacy: float | None) -> None:
        """Take a process's former reconnect setting unless the shared one is set."""
        if legacy is not None and "reconnect_interval_seconds" not in self.model_fields_set:
            self.reconnect_interval_seconds = legacy

    def broker_nodes(self) -> Nodes:
        """A fresh rotation over the nodes (one per process, shared by its connections)."""
        return Nodes.parse(self.amqp_url.get_secret_value())

    def backoff(self) -> Backoff:
        return Backoff(self.reconnect_interval_seconds)
