"""Applying one lifecycle event to a record: a Lua script, so it is atomic without WATCH.

The monotonic rule. Each status has a rank: queued 0 < admitted 1 < running 2
< terminal 3 (completed, failed, timed_out, cancelled, deduplicated). An event
*wins* when its rank is higher than the record's, or equal and not terminal
and not older (``at``, RFC 3339 text of one format, compares as text). Then:

- a winning event sets the status and its outcome fields (result, error,
  completed_at, cancelled_at, cancelled_by, duplicate_of, worker_id);
- every event, winning or not, fills the facts it carries that the record
  lacks (the submission's fields, worker_id): a late ``admitted`` still
  contributes the payload to a record already ``completed``;
- ``admitted_at`` and ``started_at`` keep the earliest time any event gave
  (after a takeover an execution may be started again; it started first then);
- nothing is ever written as null: an event that lacks a field leaves it;
- so a terminal record never changes status or outcome again, and replaying an
  event (redelivery) or applying events in any order ends in the same record.

Values are stored as JSON text; the script never parses them. Once applied,
the event (as published) is published on its execution's pub/sub channel
(``store.layout.events_channel``): the live event streams follow that.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from schemas.dispatch import LifecycleEvent
from store.layout import STATUS_POSITION, TERMINAL_RANK, rank

APPLY_EVENT_LUA = f"""
local record = KEYS[1]
local status, pos, rank, at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local ttl, bound, member = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local n_fill, n_earliest = tonumber(ARGV[8]), tonumber(ARGV[9])
local channel, body = ARGV[10], ARGV[11]

local stored = redis.call('HMGET', record, 'rank', 'status_at', 'sidx')
local old_rank = -1
if stored[1] then old_rank = tonumber(stored[1]) end
local wins = false
if rank > old_rank then
  wins = true
elseif rank == old_rank and rank < {TERMINAL_RANK} then
  wins = at >= (stored[2] or '')
end

local i = 12
local fill_end = i + 2 * n_fill
while i < fill_end do
  redis.call('HSETNX', record, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local earliest_end = i + 2 * n_earliest
while i < earliest_end do
  local current = redis.call('HGET', record, ARGV[i])
  if not current or ARGV[i + 1] < current then
    redis.call('HSET', record, ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end

local function touch(index)
  if bound ~= '' then redis.call('ZREMRANGEBYLEX', index, '-', bound) end
  redis.call('EXPIRE', index, ttl)
end

if wins then
  while i < #ARGV do
    redis.call('HSET', record, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('HSET', record, 'status', status, 'sidx', pos, 'rank', rank, 'status_at', at)
  if stored[3] and tonumber(stored[3]) ~= pos then
    redis.call('ZREM', KEYS[2 + tonumber(stored[3])], member)
  end
  redis.call('ZADD', KEYS[2 + pos], 0, member)
  touch(KEYS[2 + pos])
end
redis.call('ZADD', KEYS[2], 0, member)
touch(KEYS[2])
redis.call('EXPIRE', record, ttl)
-- In the same step as the write, so a stream that read the record before it
-- gets the event, and one that reads after it sees it in the record.
if channel ~= '' then redis.call('PUBLISH', channel, body) end
if wins then return 1 end
return 0
"""

APPLY_EVENT_SHA = hashlib.sha1(APPLY_EVENT_LUA.encode()).hexdigest()

# Fields of the submission envelope the record keeps (same names in both).
_SUBMISSION_FIELDS = (
    "workflow_id",
    "deployment_id",
    "queue_name",
    "concurrency_key",
    "created_at",
    "payload",
    "session_id",
    "user_id",
    "run_timeout_seconds",
    "parent_execution_id",
    "root_execution_id",
    "step_key",
)


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


Fields = list[tuple[str, bytes]]


def event_fields(event: LifecycleEvent) -> tuple[Fields, Fields, Fields]:
    """``(fill, earliest, win)`` of the script (see the module docstring)."""
    fill: Fields = []
    earliest: Fields = []
    win: Fields = []
    for name in ("workflow_id", "deployment_id", "queue_name", "concurrency_key"):
        value = getattr(event, name)
        if value is not None:
            fill.append((name, _json(value)))
    submission = event.submission
    if submission is not None:
        envelope = submission.model_dump(mode="json", include=set(_SUBMISSION_FIELDS))
        fill.extend((name, _json(value)) for name, value in envelope.items() if value is not None)

    status = event.status.value
    at = _json(event.at)
    if status == "admitted":
        earliest.append(("admitted_at", at))
    elif status == "running":
        earliest.append(("started_at", at))
    if event.worker_id is not None:
        worker = _json(event.worker_id)
        fill.append(("worker_id", worker))
        win.append(("worker_id", worker))
    if rank(event.status) == TERMINAL_RANK:
        win.append(("completed_at", at))
        if event.result is not None:
            win.append(("result", _json(event.result)))
        if event.error is not None:
            win.append(("error", _json(event.error.model_dump(mode="json"))))
        if event.duplicate_of is not None:
            win.append(("duplicate_of", _json(event.duplicate_of)))
        if status == "cancelled":
            win.append(("cancelled_at", at))
            if event.cancelled_by is not None:
                win.append(("cancelled_by", _json(event.cancelled_by)))
    return fill, earliest, win


def script_args(
    event: LifecycleEvent,
    *,
    ttl_seconds: int,
    trim_bound: str,
    channel: str = "",
    body: bytes = b"",
) -> list[bytes | str | int]:
    """ARGV of ``APPLY_EVENT_LUA`` for ``event``; ``body`` is published on ``channel``
    (none if empty) once the event is applied."""
    fill, earliest, win = event_fields(event)
    args: list[bytes | str | int] = [
        event.status.value,
        STATUS_POSITION[event.status],
        rank(event.status),
        event.at,
        ttl_seconds,
        trim_bound,
        event.execution_id,
        len(fill),
        len(earliest),
        channel,
        body,
    ]
    for name, value in (*fill, *earliest, *win):
        args.append(name)
        args.append(value)
    return args
