"""Applying one lifecycle event to a record: a Lua script, so it is atomic without WATCH.

Attempts first. Each event carries the delivery attempt of the submission
under which its decision was taken (``LifecycleEvent.attempt``; the
gateway's ``queued`` is 0). A decision whose acknowledgement was lost (a
broker crash) is taken again on the redelivery, and only that one is durable
(DESIGN §3). So an event of a *higher* attempt than the record's supersedes
everything the lower attempts decided (``DECISION_FIELDS``: status, outcome,
their timestamps) and is applied as to a fresh record; an event of a *lower*
attempt contributes only the submission's facts; equal attempts follow the
monotonic rule.

The monotonic rule. Each status has a rank: queued 0 < admitted 1 < running 2
< terminal 3 (completed, failed, timed_out, cancelled, deduplicated). An event
*wins* when its rank is higher than the record's, or equal and not terminal
and not older (``at``, RFC 3339 text of one format, compares as text). Then:

- a winning event sets the status and its outcome fields (result, error,
  completed_at, cancelled_at, cancelled_by, duplicate_of, worker_id);
- every event, winning or not, fills the submission's facts it carries that
  the record lacks, and (of the current attempt) the worker_id: a late
  ``admitted`` still contributes the payload to a record already ``completed``;
- ``admitted_at`` and ``started_at`` keep the earliest time any event gave
  (after a takeover an execution may be started again; it started first then);
- each failed run's error is a field of its own (``attempt_error:<retry_count>``,
  written once: the retry event of a run, or the final ``failed``), and
  ``retry_count`` keeps the highest run any event named (a run that failed
  and is to be retried counts the retry it waits for): both are facts of the
  attempt, true whatever status wins, so a late retry event fills them in a
  record already terminal and never moves its status back (a retry event is
  ``running``, below any terminal rank);
- nothing is ever written as null: an event that lacks a field leaves it;
- so within an attempt a terminal record never changes status or outcome
  again, and replaying an event (redelivery) or applying events in any order
  ends in the same record.

Values are stored as JSON text; the script never parses them. Once applied,
the event (as published) is published on its execution's pub/sub channel
(``store.layout.events_channel``): the live event streams follow that.

The store sends a batch of a project's events as one call of ``APPLY_BATCH_LUA``
(``batch_calls``): the event script above as a function, applied to each event
in turn, its arguments one JSON array (``ARGV[1]``) instead of ~40 Redis
arguments an event. Redis's ``cjson`` gives back exactly the strings Python
encoded, so each event is applied as by ``APPLY_EVENT_LUA`` with its
``script_args`` (tests/test_store_batch.py), except that each index is
trimmed and each key's TTL renewed once per call rather than once per event
(the same end state). One call per project: every key of a call shares the
project's hash tag (``store.layout``). An event Redis refuses stops the call
there: the events before it stay applied, complete, and the caller finds the
refused one by writing them one at a time (applying an event again is harmless).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import chain
from typing import Any

import orjson

from schemas.dispatch import ExecutionStatus, LifecycleEvent
from schemas.envelope import SubmissionEnvelope
from store.layout import (
    STATUS_ORDER,
    STATUS_POSITION,
    TERMINAL_RANK,
    events_channel,
    index_key,
    rank,
    record_key,
    status_index_keys,
)

# What a decision sets: cleared when a later attempt supersedes it.
DECISION_FIELDS = (
    "result",
    "error",
    "admitted_at",
    "started_at",
    "completed_at",
    "cancelled_at",
    "cancelled_by",
    "duplicate_of",
    "worker_id",
    "retry_count",
)
# A failed run's error: ATTEMPT_ERROR_PREFIX + its retry_count (0 for the first run).
ATTEMPT_ERROR_PREFIX = "attempt_error:"

_EVENT_LUA = f"""
local record = KEYS[1]
local status, pos, rank, at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local ttl, bound, member = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local attempt, n_facts = tonumber(ARGV[8]), tonumber(ARGV[9])
local n_fill, n_earliest = tonumber(ARGV[10]), tonumber(ARGV[11])
local channel, body = ARGV[12], ARGV[13]
local n_highest = tonumber(ARGV[14])

-- touch
local stored = redis.call('HMGET', record, 'rank', 'status_at', 'sidx', 'attempt')
local old_rank = -1
if stored[1] then old_rank = tonumber(stored[1]) end
local old_attempt = tonumber(stored[4] or '0')
local current = attempt >= old_attempt
if attempt > old_attempt and stored[1] then
  -- The decisions of earlier attempts were not durable: this one supersedes them.
  redis.call('HDEL', record, {", ".join(repr(f) for f in DECISION_FIELDS)})
  for _, name in ipairs(redis.call('HKEYS', record)) do
    if string.sub(name, 1, {len(ATTEMPT_ERROR_PREFIX)}) == '{ATTEMPT_ERROR_PREFIX}' then
      redis.call('HDEL', record, name)
    end
  end
  old_rank = -1
end
local wins = false
if not current then
  wins = false
elseif rank > old_rank then
  wins = true
elseif rank == old_rank and rank < {TERMINAL_RANK} then
  wins = at >= (stored[2] or '')
end

local i = 15
local facts_end = i + 2 * n_facts
while i < facts_end do
  redis.call('HSETNX', record, ARGV[i], ARGV[i + 1])
  i = i + 2
end
if not current then
  -- An earlier attempt's event: only the submission's facts above count.
  redis.call('ZADD', KEYS[2], 0, member)
  touch(KEYS[2])
  -- expire record
  return 0
end
local fill_end = i + 2 * n_fill
while i < fill_end do
  redis.call('HSETNX', record, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local earliest_end = i + 2 * n_earliest
while i < earliest_end do
  local current_value = redis.call('HGET', record, ARGV[i])
  if not current_value or ARGV[i + 1] < current_value then
    redis.call('HSET', record, ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
local highest_end = i + 2 * n_highest
while i < highest_end do
  local current_value = redis.call('HGET', record, ARGV[i])
  if not current_value or tonumber(ARGV[i + 1]) > tonumber(current_value) then
    redis.call('HSET', record, ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end

if wins then
  while i < #ARGV do
    redis.call('HSET', record, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call(
    'HSET', record, 'status', status, 'sidx', pos, 'rank', rank, 'status_at', at,
    'attempt', attempt
  )
  if stored[3] and tonumber(stored[3]) ~= pos then
    redis.call('ZREM', KEYS[2 + tonumber(stored[3])], member)
  end
  redis.call('ZADD', KEYS[2 + pos], 0, member)
  touch(KEYS[2 + pos])
end
redis.call('ZADD', KEYS[2], 0, member)
touch(KEYS[2])
-- expire record
-- In the same step as the write, so a stream that read the record before it
-- gets the event, and one that reads after it sees it in the record.
if channel ~= '' then redis.call('PUBLISH', channel, body) end
if wins then return 1 end
return 0
"""
_TOUCH_NOW = """local function touch(index)
  if bound ~= '' then redis.call('ZREMRANGEBYLEX', index, '-', bound) end
  redis.call('EXPIRE', index, ttl)
end
"""
_EXPIRE_NOW = "redis.call('EXPIRE', record, ttl)"
# The script of one event: its indexes trimmed and its keys' TTLs renewed as it goes.
APPLY_EVENT_LUA = _EVENT_LUA.replace("-- touch", _TOUCH_NOW).replace(
    "-- expire record", _EXPIRE_NOW
)

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


def _json(value: Any) -> str:
    # Text, not bytes: the batch call embeds it in JSON (the same bytes once sent).
    return orjson.dumps(value).decode()


Fields = list[tuple[str, str]]

# The submission's fields in the model's order, and those an event carries itself.
_ENVELOPE_FIELDS = tuple(n for n in SubmissionEnvelope.model_fields if n in _SUBMISSION_FIELDS)
_EVENT_FACTS = ("workflow_id", "deployment_id", "queue_name", "concurrency_key")


def event_fields(event: LifecycleEvent) -> tuple[Fields, Fields, Fields, Fields, Fields]:
    """``(facts, fill, earliest, highest, win)`` of the script (see the module docstring).

    ``facts`` are the submission's (any attempt may fill them), ``fill`` what
    the event's own decision knows (worker_id, a failed run's error).

    Values are those of the models, as JSON (the envelope's ``payload``, like the
    event's ``result``, is JSON-decoded data: ``orjson`` writes it as pydantic's
    JSON mode does). A submission fact equal to the event's own is left out: the
    script fills a fact only once (``HSETNX``), so it would change nothing.
    """
    dumps = orjson.dumps
    facts: Fields = []
    fill: Fields = []
    earliest: Fields = []
    highest: Fields = []
    win: Fields = []
    own: dict[str, Any] = {}
    for name in _EVENT_FACTS:
        value = getattr(event, name)
        if value is not None:
            own[name] = value
            facts.append((name, dumps(value).decode()))
    submission = event.submission
    if submission is not None:
        for name in _ENVELOPE_FIELDS:
            value = getattr(submission, name)
            if value is not None and (name not in own or own[name] != value):
                facts.append((name, dumps(value).decode()))

    status = event.status  # a StrEnum: compares as its value
    at = dumps(event.at).decode()
    if status == "admitted":
        earliest.append(("admitted_at", at))
    elif status == "running":
        earliest.append(("started_at", at))
    if event.started_at is not None:
        # A run that ended before it was reported running says when it started.
        earliest.append(("started_at", dumps(event.started_at).decode()))
    if event.worker_id is not None:
        worker = dumps(event.worker_id).decode()
        fill.append(("worker_id", worker))
        win.append(("worker_id", worker))
    retrying = event.retry_at is not None
    error = event.error
    if error is not None and (retrying or status == "failed"):
        failure = {
            "attempt": event.retry_count + 1,
            "error": error.model_dump(mode="json"),
            "at": event.at,
            "retry_at": event.retry_at,
            "worker_id": event.worker_id,
        }
        fill.append((f"{ATTEMPT_ERROR_PREFIX}{event.retry_count}", _json(failure)))
    # Counted once the retry is decided, not once it starts; absent means 0.
    if retry_count := event.retry_count + retrying:
        highest.append(("retry_count", _json(retry_count)))
    if _RANKS[status] == TERMINAL_RANK:
        win.append(("completed_at", at))
        if event.result is not None:
            win.append(("result", _json(event.result)))
        if error is not None:
            win.append(("error", _json(error.model_dump(mode="json"))))
        if event.duplicate_of is not None:
            win.append(("duplicate_of", _json(event.duplicate_of)))
        if status == "cancelled":
            win.append(("cancelled_at", at))
            if event.cancelled_by is not None:
                win.append(("cancelled_by", _json(event.cancelled_by)))
    return facts, fill, earliest, highest, win


_RANKS = {status: rank(status) for status in ExecutionStatus}
# ARGV[1..3] of each status: its name, its index's position, its rank.
_STATUS_ARGS = {s: (s.value, STATUS_POSITION[s], _RANKS[s]) for s in ExecutionStatus}


def script_args(
    event: LifecycleEvent,
    *,
    ttl_seconds: int,
    trim_bound: str,
    channel: str = "",
    body: bytes | str = b"",
) -> list[bytes | str | int]:
    """ARGV of ``APPLY_EVENT_LUA`` for ``event``; ``body`` is published on ``channel``
    (none if empty) once the event is applied."""
    facts, fill, earliest, highest, win = event_fields(event)
    args: list[bytes | str | int] = [
        *_STATUS_ARGS[event.status],
        event.at,
        ttl_seconds,
        trim_bound,
        event.execution_id,
        event.attempt,
        len(facts),
        len(fill),
        len(earliest),
        channel,
        body,
        len(highest),
    ]
    args.extend(chain.from_iterable(chain(facts, fill, earliest, highest, win)))
    return args


# KEYS of a batch call: per workflow its index of every execution and one index per
# status (KEYS[2..] of the event script, in that order), per execution its record.
_WORKFLOW_KEYS = 1 + len(STATUS_ORDER)

# In a batch, each index is trimmed and each key's TTL renewed once, after its events
# (the same bound and TTL for all: the same end as after each event).
_TOUCH_LATER = "local function touch(index) trim[index] = true end"
_EXPIRE_LATER = "expire[record] = true"

APPLY_BATCH_LUA = f"""
local trim, expire = {{}}, {{}}
local function apply_event(KEYS, ARGV)
{_EVENT_LUA.replace("-- touch", _TOUCH_LATER).replace("-- expire record", _EXPIRE_LATER)}
end
local batch = cjson.decode(ARGV[1])
local ttl, bound = tonumber(ARGV[2]), ARGV[3]
local function apply_all()
  for n = 1, #batch do
    local item = batch[n]
    local keys, first = {{KEYS[item[1]]}}, item[2]
    for j = 0, {_WORKFLOW_KEYS - 1} do keys[j + 2] = KEYS[first + j] end
    apply_event(keys, item[3])
  end
end
local ok, err = pcall(apply_all)
-- Also when an event failed: what was applied before it is complete.
for index in pairs(trim) do
  if bound ~= '' then redis.call('ZREMRANGEBYLEX', index, '-', bound) end
  redis.call('EXPIRE', index, ttl)
end
for key in pairs(expire) do redis.call('EXPIRE', key, ttl) end
if not ok then
  if type(err) == 'table' then return err end
  return redis.error_reply(tostring(err))
end
return #batch
"""

APPLY_BATCH_SHA = hashlib.sha1(APPLY_BATCH_LUA.encode()).hexdigest()


def batch_calls(
    events: Sequence[LifecycleEvent],
    bodies: Sequence[bytes],
    *,
    prefix: str,
    ttl_seconds: int,
    trim_bound: str,
) -> list[tuple[list[str], list[bytes | str | int]]]:
    """``(KEYS, ARGV)`` of one ``APPLY_BATCH_LUA`` call per project of ``events``
    (first seen first), each applying that project's events in their order; ``bodies``
    are published as ``script_args`` says."""
    calls: dict[str, tuple[list[str], dict[str, int], dict[str, tuple[int, str]], list[Any]]] = {}
    for event, body in zip(events, bodies, strict=True):
        project, execution = event.project_id, event.execution_id
        call = calls.get(project)
        if call is None:
            call = calls[project] = ([], {}, {}, [])
        keys, workflows, records, items = call
        first = workflows.get(event.workflow_id)
        if first is None:
            first = workflows[event.workflow_id] = len(keys) + 1
            keys.append(index_key(prefix, project, event.workflow_id))
            keys.extend(status_index_keys(prefix, project, event.workflow_id))
        known = records.get(execution)
        if known is None:
            known = records[execution] = (len(keys) + 1, events_channel(prefix, project, execution))
            keys.append(record_key(prefix, project, execution))
        args = script_args(
            event,
            ttl_seconds=ttl_seconds,
            trim_bound=trim_bound,
            channel=known[1],
            body=body.decode(),
        )
        items.append((known[0], first, args))
    return [
        (keys, [orjson.dumps(items), ttl_seconds, trim_bound])
        for keys, _, _, items in calls.values()
    ]
