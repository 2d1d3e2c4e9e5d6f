"""Idempotency keys: which execution a project's key already stands for, kept in Redis.

    <prefix>idem:{<project>}:k:<key>            a key of a submit (header) or batch item (field)
    <prefix>idem:{<project>}:b:<index>:<key>    item <index> of a batch keyed by its header

Each is a hash: ``state`` (``pending`` | ``done``), ``id`` and ``at`` (the
execution id and created_at minted before publishing), ``fp`` (the request's
fingerprint) and ``lease`` (Redis clock, ms: until then the holder of a pending
key is presumed alive, publishing). The project is part of the name, so two
projects' keys never meet; the ``{<project>}`` hash tag keeps them in one
Cluster slot, like the execution records. A project id has no ``:``, and the
index of a batch item comes before the key, so no two keys share a name.

Every transition is one Lua script on one key, so it is atomic without WATCH,
and every lease is measured on the Redis clock, so gateways whose clocks differ
agree on when a holder is presumed dead:

    (none) ──reserve──► pending(id) ──complete(id)──► done(id)        (published)
                           │ └──release(id)──► (none)                  (certainly not published)
                           └─lease over─► take_over(id → id') ──► pending(id')
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from store.execution_store import _mapped
from store.layout import DEFAULT_PREFIX
from store.pipelining import AutoPipeline, Script

DEFAULT_IDEMPOTENCY_RETENTION_SECONDS = 24 * 3600

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1]; ARGV: id, at, fp, lease ms, ttl s.  Returns {'reserved'} or what holds the key.
_RESERVE = Script(
    _NOW_MS
    + """
local found = redis.call('HMGET', KEYS[1], 'state', 'id', 'at', 'fp', 'lease')
if not found[1] then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'id', ARGV[1], 'at', ARGV[2],
             'fp', ARGV[3], 'lease', now + tonumber(ARGV[4]))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return {'reserved'}
end
local left = tonumber(found[5]) - now
local state = found[1]
if state == 'pending' and left <= 0 then state = 'stale' end
return {state, found[2], found[3], found[4], tostring(left)}
"""
)

# KEYS[1]; ARGV: the stale holder's id, id, at, lease ms, ttl s.  1 if ours now.
_TAKE_OVER = Script(
    _NOW_MS
    + """
local found = redis.call('HMGET', KEYS[1], 'state', 'id', 'lease')
if found[1] ~= 'pending' or found[2] ~= ARGV[1] or tonumber(found[3]) > now then
  return 0
end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'at', ARGV[3], 'lease', now + tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
)

# KEYS[1]; ARGV: id, ttl s.  1 if that reservation is done now.
_COMPLETE = Script("""
local found = redis.call('HMGET', KEYS[1], 'state', 'id')
if found[1] ~= 'pending' or found[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
""")

# KEYS[1]; ARGV: id.  1 if that reservation is gone now.
_RELEASE = Script("""
local found = redis.call('HMGET', KEYS[1], 'state', 'id')
if found[1] ~= 'pending' or found[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
""")


class Held(StrEnum):
    """What holds a key another request reserved."""

    PENDING = "pending"  # its holder is publishing (lease not over)
    STALE = "stale"  # pending, lease over: its holder is presumed dead
    DONE = "done"  # published: the key stands for that execution


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request asks a key to stand for."""

    redis_key: str
    execution_id: str
    created_at: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Holder:
    """What a key stands for already."""

    state: Held
    execution_id: str
    created_at: str
    fingerprint: str
    lease_left_seconds: float


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class IdempotencyKeys:
    """Reserve, complete, release and take over idempotency keys (see the module docstring).

    Raises ``StoreUnavailable`` when Redis cannot take a request and ``StoreError``
    when it refuses one.
    """

    def __init__(
        self,
        redis_client: aioredis.Redis,
        *,
        retention_seconds: int = DEFAULT_IDEMPOTENCY_RETENTION_SECONDS,
        lease_seconds: float,
        key_prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if retention_seconds < 1 or lease_seconds <= 0:
            raise ValueError("retention and lease must be positive")
        self._redis = redis_client
        self.retention_seconds = retention_seconds
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.key_prefix = key_prefix
        self._calls = AutoPipeline(redis_client)

    def key(self, project_id: str, key: str) -> str:
        return f"{self.key_prefix}idem:{{{project_id}}}:k:{key}"

    def batch_item_key(self, project_id: str, index: int, key: str) -> str:
        return f"{self.key_prefix}idem:{{{project_id}}}:b:{index}:{key}"

    async def reserve(self, wanted: Sequence[Reservation]) -> list[Holder | None]:
        """Reserve each key for its execution (None: reserved now) or say what holds it."""
        ttl = self.retention_seconds
        replies = await self._run(
            _RESERVE,
            [
                (r.redis_key, [r.execution_id, r.created_at, r.fingerprint, self.lease_ms, ttl])
                for r in wanted
            ],
            "reserve",
        )
        return [_holder(reply) for reply in replies]

    async def take_over(self, stale: Holder, wanted: Reservation) -> bool:
        """Whether ``wanted`` now holds the key whose holder ``stale`` let its lease pass."""
        args = [
            stale.execution_id,
            wanted.execution_id,
            wanted.created_at,
            self.lease_ms,
            self.retention_seconds,
        ]
        [taken] = await self._run(_TAKE_OVER, [(wanted.redis_key, args)], "take over")
        return bool(taken)

    async def complete(self, published: Sequence[tuple[str, str]]) -> None:
        """(redis key, execution id) pairs whose execution is published: done for the retention."""
        ttl = self.retention_seconds
        await self._run(_COMPLETE, [(k, [i, ttl]) for k, i in published], "complete")

    async def release(self, unpublished: Sequence[tuple[str, str]]) -> None:
        """(redis key, execution id) pairs certainly never published: the keys are free again."""
        await self._run(_RELEASE, [(k, [i]) for k, i in unpublished], "release")

    async def _run(
        self, script: Script, calls: Sequence[tuple[str, list[Any]]], what: str
    ) -> list[Any]:
        with _mapped(f"idempotency {what}"):
            if len(calls) == 1:
                key, args = calls[0]
                return [await self._calls.evalsha(script, [key], args)]
            replies = await asyncio.gather(
                *(self._calls.evalsha(script, [key], args) for key, args in calls)
            )
        return list(replies)


def _holder(reply: list[Any]) -> Holder | None:
    state = _text(reply[0])
    if state == "reserved":
        return None
    return Holder(
        Held(state),
        _text(reply[1]),
        _text(reply[2]),
        _text(reply[3]),
        max(0.0, int(_text(reply[4])) / 1000),
    )
