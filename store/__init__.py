"""The execution store: what became of each execution, kept in Redis for a retention.

The recorder writes it from the lifecycle events; the gateway's status
endpoints read it. See ``docs/architecture.md`` ("Execution store").
"""

from store.errors import InvalidCursor, StoreError, StoreUnavailable
from store.execution_store import (
    DEFAULT_RETENTION_SECONDS,
    MAX_LIST_LIMIT,
    ExecutionStore,
    open_redis,
)

__all__ = [
    "DEFAULT_RETENTION_SECONDS",
    "MAX_LIST_LIMIT",
    "ExecutionStore",
    "InvalidCursor",
    "StoreError",
    "StoreUnavailable",
    "open_redis",
]
