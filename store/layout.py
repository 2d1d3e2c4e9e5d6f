"""Where things live in Redis, and the order of statuses.

    <prefix>exec:{<project>}:<execution_id>         hash: one execution
    <prefix>runs:{<project>}:all:<workflow_id>      zset: every execution of the workflow
    <prefix>runs:{<project>}:<status>:<workflow_id> zset: those whose status is <status>
    <prefix>events:{<project>}:<execution_id>       pub/sub channel: each event, as recorded

Every sorted-set member has score 0 and is an execution id: UUIDv7 ids in their
canonical (lowercase) text sort by creation time, so a lexicographic range
(``ZRANGE ... BYLEX REV``) lists newest first, and the id of the last row is an
exact cursor. The ``{<project>}`` hash tag keeps a project's keys in one Cluster
slot, so the update script's keys are always co-located.

The workflow id comes last in index keys: it may contain ``:``, a project id and
a status may not, so no two (project, status, workflow) share a key.
"""

from __future__ import annotations

import base64
import binascii
import re

from schemas.dispatch import TERMINAL_STATUSES, ExecutionStatus
from store.errors import InvalidCursor

DEFAULT_PREFIX = "polos:"

# The position of each status: KEYS[2 + position] of the update script is its index.
STATUS_ORDER: tuple[ExecutionStatus, ...] = tuple(ExecutionStatus)
STATUS_POSITION = {status: i + 1 for i, status in enumerate(STATUS_ORDER)}

TERMINAL_RANK = 3


def rank(status: ExecutionStatus) -> int:
    """queued < admitted < running < any terminal status."""
    if status in TERMINAL_STATUSES:
        return TERMINAL_RANK
    return {ExecutionStatus.QUEUED: 0, ExecutionStatus.ADMITTED: 1, ExecutionStatus.RUNNING: 2}[
        status
    ]


def record_key(prefix: str, project_id: str, execution_id: str) -> str:
    return f"{prefix}exec:{{{project_id}}}:{execution_id}"


def events_channel(prefix: str, project_id: str, execution_id: str) -> str:
    """Where the recorder publishes each event of an execution once it is written (live
    event streams subscribe here). Pub/sub channels ignore the database number: the
    prefix is what keeps two environments on one Redis apart."""
    return f"{prefix}events:{{{project_id}}}:{execution_id}"


def index_key(
    prefix: str, project_id: str, workflow_id: str, status: ExecutionStatus | None = None
) -> str:
    part = "all" if status is None else status.value
    return f"{prefix}runs:{{{project_id}}}:{part}:{workflow_id}"


def status_index_keys(prefix: str, project_id: str, workflow_id: str) -> list[str]:
    return [index_key(prefix, project_id, workflow_id, status) for status in STATUS_ORDER]


def trim_bound(cutoff_unix_ms: int) -> str:
    """Exclusive lex bound below which ids were minted before ``cutoff_unix_ms``.

    A UUIDv7's text starts with its 48-bit millisecond timestamp as
    ``xxxxxxxx-xxxx``; every id minted at or after the cutoff sorts above it.
    """
    ms = max(cutoff_unix_ms, 0)
    return f"({ms >> 16:08x}-{ms & 0xFFFF:04x}"


_CURSOR_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def encode_cursor(execution_id: str) -> str:
    return base64.urlsafe_b64encode(execution_id.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> str:
    """The execution id a cursor points after; ``InvalidCursor`` if we never issued it."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        execution_id = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor("malformed cursor") from exc
    if not _CURSOR_ID.match(execution_id):
        raise InvalidCursor("malformed cursor")
    return execution_id
