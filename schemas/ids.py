"""Execution ids (UUIDv7, RFC 9562) and RFC 3339 timestamps.

Python 3.11 has no ``uuid.uuid7``; this is the RFC layout with a per-process
monotonic guard so ids minted in the same millisecond still sort in order.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

_last_ms = 0
_seq = 0


def uuid7_at(unix_ms: int) -> uuid.UUID:
    """A UUIDv7 for ``unix_ms``: 48-bit ms timestamp, 12-bit sequence, 62 random bits."""
    global _last_ms, _seq
    if unix_ms <= _last_ms:
        # Same (or earlier, if the clock stepped back) millisecond: keep order by
        # counting in rand_a; on overflow borrow the next millisecond.
        _seq += 1
        if _seq > 0xFFF:
            _last_ms += 1
            _seq = 0
        unix_ms = _last_ms
    else:
        _last_ms = unix_ms
        _seq = int.from_bytes(os.urandom(2)) & 0x3FF  # leave headroom for the counter
    rand_b = int.from_bytes(os.urandom(8)) & 0x3FFF_FFFF_FFFF_FFFF
    value = (unix_ms << 80) | (0x7 << 76) | (_seq << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def new_execution_id() -> tuple[str, str]:
    """A fresh execution id and its creation time (RFC 3339, UTC), from one clock reading."""
    now_ns = time.time_ns()
    unix_ms = now_ns // 1_000_000
    execution_id = uuid7_at(unix_ms)
    return str(execution_id), rfc3339(now_ns)


def rfc3339(unix_ns: int) -> str:
    """``2026-11-28T11:18:24.123456Z``."""
    dt = datetime.fromtimestamp(unix_ns / 1e9, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The Unix millisecond embedded in a UUIDv7."""
    return value.int >> 80


def now_rfc3339() -> str:
    return rfc3339(time.time_ns())
