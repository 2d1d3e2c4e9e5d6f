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
(``batch_calls``): the rules above applied to each event in turn, its arguments one
JSON array (``ARGV[1]``) instead of ~40 Redis arguments an event, and the bodies to
publish one after another in ``ARGV[5]`` (not escaped into the JSON). Redis's
``cjson`` gives back exactly the strings Python encoded. ``APPLY_EVENT_LUA`` with
``script_args`` is the reference: each event of a batch is applied as by it, one call
an event (tests/test_store_batch.py), with fewer Redis commands: one ``HMGET`` reads
the record's state and every field the event may fill or compare, one ``HSET`` writes
what the rules decide (in the reference's order, so a small hash lists its fields in
the same order), each index is trimmed and each key's TTL renewed once per call
rather than once per event, an execution enters its workflow's index once a call, and
a fact an earlier event of the call sent for the record is not sent again (the same
end state). One call per project: every key of a call shares the project's hash tag
(``store.layout``). An event Redis refuses stops the call there: the events before it
stay applied, complete, and the caller finds the refused one by writing them one at a
time (applying an event again is harmless).
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


def event_fields(
    event: LifecycleEvent, sent: set[str] | None = None
) -> tuple[Fields, Fields, Fields, Fields, Fields]:
    """``(facts, fill, earliest, highest, win)`` of the script (see the module docstring).

    ``facts`` are the submission's (any attempt may fill them), ``fill`` what
    the event's own decision knows (worker_id, a failed run's error).

    Values are those of the models, as JSON (the envelope's ``payload``, like the
    event's ``result``, is JSON-decoded data: ``orjson`` writes it as pydantic's
    JSON mode does). A fact named in ``sent`` (those an earlier event of the same
    call sent for the record; the names sent are added to it), or the submission's
    of a fact the event carries itself, is left out: the script fills a fact only
    once (``HSETNX``) and never deletes one, so it would change nothing.
    """
    dumps = orjson.dumps
    facts: Fields = []
    fill: Fields = []
    earliest: Fields = []
    highest: Fields = []
    win: Fields = []
    if sent is None:
        sent = set()
    for name in _EVENT_FACTS:
        if name not in sent:
            value = getattr(event, name)
            if value is not None:
                sent.add(name)
                facts.append((name, dumps(value).decode()))
    submission = event.submission
    if submission is not None:
        for name in _ENVELOPE_FIELDS:
            if name not in sent:
                value = getattr(submission, name)
                if value is not None:
                    sent.add(name)
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

_STATUS_LUA = ", ".join(
    f"{status.value} = {{{position}, {_RANKS[status]}}}"
    for status, position in STATUS_POSITION.items()
)
_DECISION_LUA = ", ".join(f"{name} = true" for name in DECISION_FIELDS)
# A fact is never deleted (a later attempt clears decisions only): once a call has sent
# one for a record, the record has it for the rest of the call.
assert not set(_EVENT_FACTS + _SUBMISSION_FIELDS) & set(DECISION_FIELDS)
assert not any(n.startswith(ATTEMPT_ERROR_PREFIX) for n in _EVENT_FACTS + _SUBMISSION_FIELDS)

# The event script's rules with fewer Redis commands an event: one HMGET reads the
# record's state and every field the event may fill (or compare), one HSET writes what
# the rules decide, in the order the event script writes it (so the same fields come
# first, as ``HGETALL`` lists them), and each execution enters its workflow's index once
# a call. Trims and TTLs once a call, as above.
APPLY_BATCH_LUA = f"""
local items = cjson.decode(ARGV[1])
local ttl, bound, channels, bodies = tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local STATUS = {{{_STATUS_LUA}}}
local DECISION = {{{_DECISION_LUA}}}
local function attempt_error(name)
  return string.sub(name, 1, {len(ATTEMPT_ERROR_PREFIX)}) == '{ATTEMPT_ERROR_PREFIX}'
end
local trim, expire, indexed = {{}}, {{}}, {{}}
local offset = 1
-- An event's writes, reused (only its first n entries count): no table an event.
local writes = {{}}

local function index_all(first, member)
  local seen = indexed[first]
  if not seen then
    seen = {{}}
    indexed[first] = seen
  end
  if not seen[member] then
    redis.call('ZADD', KEYS[first], 0, member)
    seen[member] = true
  end
  trim[KEYS[first]] = true
end

local function apply_event(item)
  local record, first = KEYS[item[1]], item[2]
  local status, at, member, attempt = item[3], item[4], item[5], item[6]
  local pos, rank = STATUS[status][1], STATUS[status][2]
  local body = string.sub(bodies, offset, offset + item[7] - 1)
  offset = offset + item[7]
  local n_facts, n_fill, n_earliest, n_highest = item[8], item[9], item[10], item[11]
  -- The names of the fields read, then their values; the winner's fields in pairs after.
  local n_read = n_facts + n_fill + n_earliest + n_highest
  local names, values = 11, 11 + n_read
  local stored = redis.call(
    'HMGET', record, 'rank', 'status_at', 'sidx', 'attempt', unpack(item, 12, 11 + n_read)
  )

  local old_rank = -1
  if stored[1] then old_rank = tonumber(stored[1]) end
  local old_attempt = tonumber(stored[4] or '0')
  local current = attempt >= old_attempt
  if attempt > old_attempt and stored[1] then
    -- The decisions of earlier attempts were not durable: this one supersedes them.
    redis.call('HDEL', record, {", ".join(repr(f) for f in DECISION_FIELDS)})
    for _, name in ipairs(redis.call('HKEYS', record)) do
      if attempt_error(name) then redis.call('HDEL', record, name) end
    end
    -- What was read of the fields just deleted is gone too.
    for k = 1, n_read do
      local name = item[names + k]
      if DECISION[name] or attempt_error(name) then stored[4 + k] = false end
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

  -- Each name read occurs once, but for one field ``earliest`` may name twice in a row.
  local n = 0
  local k = 1
  while k <= n_facts do
    if not stored[4 + k] then
      writes[n + 1], writes[n + 2], n = item[names + k], item[values + k], n + 2
    end
    k = k + 1
  end
  if not current then
    -- An earlier attempt's event: only the submission's facts above count.
    if n > 0 then redis.call('HSET', record, unpack(writes, 1, n)) end
    index_all(first, member)
    expire[record] = true
    return
  end
  local fill_end = n_facts + n_fill
  while k <= fill_end do
    if not stored[4 + k] then
      writes[n + 1], writes[n + 2], n = item[names + k], item[values + k], n + 2
    end
    k = k + 1
  end
  local earliest_end = fill_end + n_earliest
  local last_name, last_value = nil, nil
  while k <= earliest_end do
    local name, value = item[names + k], item[values + k]
    local current_value = stored[4 + k]
    if name == last_name then current_value = last_value end
    if not current_value or value < current_value then
      writes[n + 1], writes[n + 2], n = name, value, n + 2
      current_value = value
    end
    last_name, last_value = name, current_value
    k = k + 1
  end
  while k <= n_read do
    local value, current_value = item[values + k], stored[4 + k]
    if not current_value or tonumber(value) > tonumber(current_value) then
      writes[n + 1], writes[n + 2], n = item[names + k], value, n + 2
    end
    k = k + 1
  end
  if wins then
    local i = 12 + 2 * n_read
    while i < #item do
      writes[n + 1], writes[n + 2], n = item[i], item[i + 1], n + 2
      i = i + 2
    end
    writes[n + 1], writes[n + 2], writes[n + 3], writes[n + 4] = 'status', status, 'sidx', pos
    writes[n + 5], writes[n + 6], writes[n + 7], writes[n + 8] = 'rank', rank, 'status_at', at
    writes[n + 9], writes[n + 10], n = 'attempt', attempt, n + 10
  end
  if n > 0 then redis.call('HSET', record, unpack(writes, 1, n)) end
  if wins then
    if stored[3] and tonumber(stored[3]) ~= pos then
      redis.call('ZREM', KEYS[first + tonumber(stored[3])], member)
    end
    local index = KEYS[first + pos]
    redis.call('ZADD', index, 0, member)
    trim[index] = true
  end
  index_all(first, member)
  expire[record] = true
  -- In the same step as the write, so a stream that read the record before it
  -- gets the event, and one that reads after it sees it in the record.
  redis.call('PUBLISH', channels .. member, body)
end

local function apply_all()
  for n = 1, #items do apply_event(items[n]) end
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
return #items
"""

APPLY_BATCH_SHA = hashlib.sha1(APPLY_BATCH_LUA.encode()).hexdigest()
_STATUS_NAMES = {s: s.value for s in ExecutionStatus}


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
    are published as ``script_args`` says.

    ARGV: the events as one JSON array (per event the positions of its record's and
    its workflow's keys, status, time, id, attempt, its body's length, how many fields
    of each kind it reads, their names, their values, then the winner's fields in
    pairs), the TTL, the trim bound, the project's events channel without the
    execution id, and the bodies one after another (no JSON escaping of them on either
    side). A fact an earlier event of the call sent for the record is not sent again."""
    calls: dict[
        str,
        tuple[list[str], dict[str, int], dict[str, tuple[int, set[str]]], list[Any], list[bytes]],
    ] = {}
    for event, body in zip(events, bodies, strict=True):
        project, execution = event.project_id, event.execution_id
        call = calls.get(project)
        if call is None:
            call = calls[project] = ([], {}, {}, [], [])
        keys, workflows, records, items, texts = call
        first = workflows.get(event.workflow_id)
        if first is None:
            first = workflows[event.workflow_id] = len(keys) + 1
            keys.append(index_key(prefix, project, event.workflow_id))
            keys.extend(status_index_keys(prefix, project, event.workflow_id))
        known = records.get(execution)
        if known is None:
            known = records[execution] = (len(keys) + 1, set())
            keys.append(record_key(prefix, project, execution))
        facts, fill, earliest, highest, win = event_fields(event, known[1])
        item: list[Any] = [
            known[0],
            first,
            _STATUS_NAMES[event.status],
            event.at,
            execution,
            event.attempt,
            len(body),
            len(facts),
            len(fill),
            len(earliest),
            len(highest),
        ]
        read = facts + fill + earliest + highest
        if read:
            names, values = zip(*read, strict=True)
            item.extend(names)
            item.extend(values)
        item.extend(chain.from_iterable(win))
        items.append(item)
        texts.append(body)
    return [
        (
            keys,
            [
                orjson.dumps(items),
                ttl_seconds,
                trim_bound,
                events_channel(prefix, project, ""),
                b"".join(texts),
            ],
        )
        for project, (keys, _, _, items, texts) in calls.items()
    ]
