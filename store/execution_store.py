"""The execution store: one Redis hash per execution, indexes per workflow, a TTL on all.

Writes come from the recorder only, in batches: one script call per project of a
batch, all in one round trip. Reads serve the status API. Nothing on the
submission path touches it.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from schemas.dispatch import ErrorInfo, ExecutionStatus, LifecycleEvent, encode
from schemas.ids import rfc3339, uuid7_time_ms
from schemas.records import ExecutionRecord
from store.errors import StoreBusy, StoreError, StoreUnavailable
from store.layout import (
    DEFAULT_PREFIX,
    decode_cursor,
    encode_cursor,
    index_key,
    record_key,
    trim_bound,
)
from store.update import APPLY_BATCH_LUA, APPLY_BATCH_SHA, ATTEMPT_ERROR_PREFIX, batch_calls

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
MAX_LIST_LIMIT = 1000
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_POOL_TIMEOUT_SECONDS = 5.0

# Redis is up but cannot take writes for now: the same as down for our callers.
_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    OSError,
)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except redis_errors.ConnectionError as exc:
        # The blocking pool's wait for a free connection ran out: Redis itself
        # may be fine, there were more requests at once than connections.
        if isinstance(exc.__cause__, TimeoutError):
            raise StoreBusy(f"no redis connection came free in time ({what})") from exc
        raise StoreUnavailable(f"redis unavailable ({what}): {exc!r}") from exc
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis unavailable ({what}): {exc!r}") from exc
    except redis_errors.RedisError as exc:
        raise StoreError(f"redis refused {what}: {exc!r}") from exc


def open_redis(
    url: str,
    *,
    timeout_seconds: float = 2.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    pool_timeout_seconds: float = DEFAULT_POOL_TIMEOUT_SECONDS,
) -> aioredis.Redis:
    """A client that fails fast when Redis is away (one quick retry, bounded timeouts).

    redis-py's default retries for several seconds; our callers have their own
    answer to an outage (503, or keep the events in the queue) and want it soon.

    At most ``max_connections`` are open at once; a request that finds them all
    in use waits up to ``pool_timeout_seconds`` for one (``StoreBusy`` after
    that). redis-py's default pool refuses at once instead, so a burst of status
    reads beyond the pool size failed while Redis was healthy.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_seconds,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


class ExecutionStore:
    """Records lifecycle events; answers what became of an execution.

    ``redis_client`` may decode responses or not. ``key_prefix`` lets several
    stores (tests, environments) share one Redis database.
    """

    def __init__(
        self,
        redis_client: aioredis.Redis,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        *,
        key_prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if retention_seconds < 1:
            raise ValueError("retention_seconds must be at least 1")
        self._redis = redis_client
        self.retention_seconds = retention_seconds
        self.key_prefix = key_prefix

    # -- writes ----------------------------------------------------------------------

    async def record(
        self, events: Sequence[LifecycleEvent], bodies: Sequence[bytes] | None = None
    ) -> None:
        """Apply ``events`` (any order, duplicates allowed) in one round trip, and publish
        each on its execution's channel (``bodies``: the events as they were published;
        encoded here if not given).

        Raises ``StoreUnavailable`` when Redis cannot take them (nothing or
        part of the batch may be applied; applying it again is harmless), and
        ``StoreError`` when Redis refused one of them.
        """
        if not events:
            return
        if bodies is None:
            bodies = [encode(event) for event in events]
        bound = trim_bound(int(time.time() * 1000) - self.retention_seconds * 1000)
        calls = batch_calls(
            events,
            bodies,
            prefix=self.key_prefix,
            ttl_seconds=self.retention_seconds,
            trim_bound=bound,
        )
        with _mapped("record"):
            results = await self._apply(calls)
            if any(isinstance(r, redis_errors.NoScriptError) for r in results):
                # The script cache is empty (Redis restarted or was flushed).
                await self._redis.script_load(APPLY_BATCH_LUA)
                results = await self._apply(calls)
        for result in results:
            if isinstance(result, Exception):
                with _mapped("record"):
                    raise result

    async def _apply(self, calls: Sequence[tuple[list[str], list[bytes | str | int]]]) -> list[Any]:
        """One ``APPLY_BATCH_LUA`` call per project, in one round trip.

        A call that fails part way (Redis refused an event) has applied the
        events before that one: the caller writes them again, harmlessly."""
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", APPLY_BATCH_SHA, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    # -- reads -----------------------------------------------------------------------

    async def get(self, project_id: str, execution_id: str) -> ExecutionRecord | None:
        """The record, or None if unknown, expired, or another project's."""
        with _mapped("get"):
            fields = await self._redis.hgetall(
                record_key(self.key_prefix, project_id, execution_id)
            )
        return _to_record(project_id, execution_id, fields)

    async def list_runs(
        self,
        project_id: str,
        workflow_id: str,
        status: ExecutionStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[ExecutionRecord], str | None]:
        """A page of the workflow's executions, newest first, and the cursor of the next.

        ``cursor`` is a value this method returned (``InvalidCursor`` otherwise);
        the next cursor is None on the last page.
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        index = index_key(self.key_prefix, project_id, workflow_id, status)
        upper = "+" if cursor is None else "(" + decode_cursor(cursor)
        found: list[ExecutionRecord] = []
        # One more than asked tells whether there is a next page. Entries whose
        # record expired before the index was trimmed are dropped on the way.
        while len(found) <= limit:
            want = limit + 1 - len(found)
            with _mapped("list_runs"):
                ids = [
                    _text(member)
                    for member in await self._redis.zrange(
                        index, upper, "-", desc=True, bylex=True, offset=0, num=want
                    )
                ]
                if not ids:
                    break
                pipe = self._redis.pipeline(transaction=False)
                for execution_id in ids:
                    pipe.hgetall(record_key(self.key_prefix, project_id, execution_id))
                rows: list[Mapping[Any, Any]] = await pipe.execute()
                gone = []
                for execution_id, fields in zip(ids, rows, strict=True):
                    record = _to_record(project_id, execution_id, fields)
                    if record is None:
                        gone.append(execution_id)
                    elif status is None or record.status == status:
                        found.append(record)
                if gone:
                    await self._redis.zrem(index, *gone)
            if len(ids) < want:
                break
            upper = "(" + ids[-1]
        if len(found) > limit:
            return found[:limit], encode_cursor(found[limit - 1].id)
        return found, None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _to_record(
    project_id: str, execution_id: str, fields: Mapping[Any, Any]
) -> ExecutionRecord | None:
    if not fields:
        return None
    raw = {_text(name): value for name, value in fields.items()}
    status = raw.pop("status", None)
    if status is None:
        return None
    data: dict[str, Any] = {}
    failures: list[dict[str, Any]] = []
    for name, value in raw.items():
        if name in ("sidx", "rank", "status_at", "attempt"):
            continue
        if name.startswith(ATTEMPT_ERROR_PREFIX):
            failures.append(_attempt_error(orjson.loads(value)))
        else:
            data[name] = orjson.loads(value)
    failures.sort(key=lambda failure: int(failure["attempt"]))
    data["attempt_errors"] = failures
    error = data.pop("error", None)
    if error is not None:
        info = ErrorInfo.model_validate(error)
        data["error"] = f"{info.type}: {info.message}"
        data["error_details"] = info
    if "created_at" not in data:
        data["created_at"] = _created_at_from_id(execution_id) or _text(raw["status_at"])
    return ExecutionRecord.model_validate(
        {**data, "id": execution_id, "project_id": project_id, "status": _text(status)}
    )


def _attempt_error(stored: dict[str, Any]) -> dict[str, Any]:
    info = ErrorInfo.model_validate(stored["error"])
    return {**stored, "error": f"{info.type}: {info.message}", "error_details": info}


def _created_at_from_id(execution_id: str) -> str | None:
    """The creation time a UUIDv7 carries (a record whose submission event is late)."""
    try:
        value = uuid.UUID(execution_id)
    except ValueError:
        return None
    if value.version != 7:
        return None
    return rfc3339(uuid7_time_ms(value) * 1_000_000)
