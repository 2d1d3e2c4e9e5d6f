"""The execution store: what became of each execution, kept in Redis for a retention.

The recorder writes it from the lifecycle events; the gateway's status
endpoints read it. See ``docs/architecture.md`` ("Execution store").
"""

from store.errors import InvalidCursor, StoreBusy, StoreError, StoreUnavailable
from store.execution_store import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT_SECONDS,
    DEFAULT_RETENTION_SECONDS,
    MAX_LIST_LIMIT,
    ExecutionStore,
    open_redis,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_POOL_TIMEOUT_SECONDS",
    "DEFAULT_RETENTION_SECONDS",
    "MAX_LIST_LIMIT",
    "ExecutionStore",
    "InvalidCursor",
    "StoreBusy",
    "StoreError",
    "StoreUnavailable",
    "open_redis",
]
