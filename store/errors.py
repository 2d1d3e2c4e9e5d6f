"""Errors of the execution store. redis-py errors are mapped to these at the boundary.

StoreError
├── StoreUnavailable   Redis cannot be reached, is loading, read-only or out of memory
│   │                  (retry later; the status API answers 503)
│   └── StoreBusy      Redis is up, but no connection of the pool came free in time
└── InvalidCursor      a list cursor this store did not issue (also a ValueError → 400)
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error this package raises."""


class StoreUnavailable(StoreError):
    """Redis cannot take the request now; nothing was lost, try again later."""


class StoreBusy(StoreUnavailable):
    """Every pooled connection stayed in use for the whole wait: too many reads at once."""


class InvalidCursor(StoreError, ValueError):
    """The cursor is not one that ``list_runs`` returned."""
