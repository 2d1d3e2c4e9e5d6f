"""What every process reads about its logs, metrics and traces (``POLOS_*``).

Each process's own settings carry one of these as ``observe``, so the fields are
declared once, not in four classes.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ObserveSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POLOS_", extra="ignore")

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: one readable line per record; json: one JSON object a line, with "
        "execution_id, project_id and queue_name where known",
    )
    log_level: str = "INFO"
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Serve /metrics on this port; 0 = no metrics"
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address of the metrics listener")
    metrics_queues: str = Field(
        default="*",
        description='fnmatch patterns over "<project>/<queue>" that get labels of their own; '
        'the rest is counted under project and queue "~other"',
    )
    metrics_max_queues: int = Field(
        default=100,
        ge=0,
        description="At most this many (project, queue) label pairs per process: queues "
        "seen after that are counted under ~other, which bounds the series count",
    )

    def queue_patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.metrics_queues.split(",") if p.strip())


OTHER = "~other"  # not a valid project id, so it never names a real queue


class QueueLabels:
    """(project, queue) → the label values to count them under, bounded in number.

    The first ``metrics_max_queues`` matching pairs seen keep their names for the
    life of the process; every other pair is ``("~other", "~other")``.
    """

    def __init__(self, settings: ObserveSettings) -> None:
        self._patterns = settings.queue_patterns()
        self._cap = settings.metrics_max_queues
        self._named: dict[tuple[str, str], tuple[str, str]] = {}
        self._others: set[tuple[str, str]] = set()

    def __call__(self, project_id: str, queue_name: str) -> tuple[str, str]:
        key = (project_id, queue_name)
        named = self._named.get(key)
        if named is not None:
            return named
        if key in self._others:
            return (OTHER, OTHER)
        if len(self._named) < self._cap and any(
            fnmatchcase(f"{project_id}/{queue_name}", p) for p in self._patterns
        ):
            self._named[key] = key
            return key
        if len(self._others) >= 10_000:
            self._others.clear()  # only a lookup cache: bounded, recomputed when needed
        self._others.add(key)
        return (OTHER, OTHER)
