"""Script calls of concurrent callers share round trips: one pipeline in flight, the
calls that arrive meanwhile wait for the next.

redis-py has no automatic pipelining: every awaited command takes a pooled
connection, encodes, writes and parses on its own, more than 100 µs of CPU a
call on our 2-core machine. The gateway makes two calls per keyed submission
from many requests at once; sent together they cost a fraction of that each
(``docs/benchmarks.md``, "Idempotency keys"). A lone call is still sent at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors


@dataclass(frozen=True, slots=True)
class Script:
    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


@dataclass(slots=True)
class _Call:
    script: Script
    args: tuple[Any, ...]  # numkeys, keys..., args...
    future: asyncio.Future[Any]


class AutoPipeline:
    def __init__(self, redis_client: aioredis.Redis) -> None:
        self._redis = redis_client
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply; raises what redis-py raises for it (unmapped)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, (len(keys), *keys, *args), future))
        if self._sender is None:
            self._sender = loop.create_task(self._send_all())
        return await future

    async def _send_all(self) -> None:
        try:
            while self._queue:
                calls, self._queue = self._queue, []
                await self._send(calls)
        finally:
            self._sender = None

    async def _send(self, calls: list[_Call]) -> None:
        try:
            replies = await self._pipeline(calls)
            missing = [
                i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)
            ]
            if missing:
                # Redis restarted or was flushed since the scripts were last loaded.
                for script in {calls[i].script for i in missing}:
                    await self._redis.script_load(script.text)
                again = await self._pipeline([calls[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else redis_errors.ConnectionError(repr(exc))
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():
                continue  # its caller is gone (cancelled)
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", call.script.sha, *call.args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
