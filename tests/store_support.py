"""Helpers for the execution store and recorder tests: Redis, key prefixes, events.

Every test writes under a key prefix of its own in the shared Redis and
deletes its keys afterwards; the shared Redis is never flushed or stopped.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection
from yarl import URL

from recorder import Recorder, RecorderSettings
from schemas.dispatch import ErrorInfo, ExecutionStatus, LifecycleEvent, encode, encode_event_batch
from schemas.envelope import SubmissionEnvelope
from schemas.ids import rfc3339
from schemas.topology import EVENTS_EXCHANGE, event_batch_routing_key, event_routing_key
from store import ExecutionStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("POLOS_REDIS_URL", DEFAULT_REDIS_URL)


def redis_host_port() -> tuple[str, int]:
    url = URL(redis_url())
    return url.host or "127.0.0.1", url.port or 6379


@asynccontextmanager
async def redis_client(key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the shared Redis; deletes every ``key_prefix*`` key at the end."""
    client = aioredis.Redis.from_url(redis_url())
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.fail(
            f"No Redis answers at {redis_url()} ({exc!r}). Start one (`make services`) or "
            "set POLOS_REDIS_URL. Tests never skip for this."
        )
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` (sync or async) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def uuid7_for(unix_ms: int) -> str:
    """A UUIDv7 minted at exactly ``unix_ms`` (``schemas.ids.uuid7_at`` never goes back
    in time within a process, and tests need runs created in the past)."""
    rand = int.from_bytes(os.urandom(10))
    value = (unix_ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    return str(uuid.UUID(int=value))


class Run:
    """One execution of a test: builds its submission and its lifecycle events."""

    def __init__(
        self,
        project_id: str,
        workflow_id: str = "summarize",
        *,
        created_ms: int | None = None,
        queue_name: str = "emails",
        concurrency_key: str | None = None,
        payload: Any = None,
    ) -> None:
        ms = created_ms if created_ms is not None else time.time_ns() // 1_000_000
        self.execution_id = uuid7_for(ms)
        self.created_at = rfc3339(ms * 1_000_000)
        self.project_id = project_id
        self.workflow_id = workflow_id
        self.queue_name = queue_name
        self.concurrency_key = concurrency_key
        self.payload = payload if payload is not None else {"n": self.execution_id}
        self._tick = ms * 1_000_000

    def submission(self) -> SubmissionEnvelope:
        return SubmissionEnvelope(
            execution_id=self.execution_id,
            created_at=self.created_at,
            project_id=self.project_id,
            workflow_id=self.workflow_id,
            deployment_id="dep-1",
            queue_name=self.queue_name,
            concurrency_key=self.concurrency_key,
            run_timeout_seconds=60,
            payload=self.payload,
            session_id=f"session-{self.execution_id}",
            user_id="user-7",
            parent_execution_id=None,
            root_execution_id=None,
            step_key=None,
            submitted_by="key_test",
        )

    def at(self) -> str:
        """A timestamp later than every one this run handed out before."""
        self._tick += 1_000_000
        return rfc3339(self._tick)

    def event(self, status: ExecutionStatus, **fields: Any) -> LifecycleEvent:
        values: dict[str, Any] = {
            "status": status,
            "execution_id": self.execution_id,
            "project_id": self.project_id,
            "workflow_id": self.workflow_id,
            "deployment_id": "dep-1",
            "queue_name": self.queue_name,
            "concurrency_key": self.concurrency_key,
            "at": self.at(),
        }
        values.update(fields)
        return LifecycleEvent(**values)

    def admitted(self) -> LifecycleEvent:
        return self.event(ExecutionStatus.ADMITTED, submission=self.submission())

    def running(self, worker_id: str = "worker-1") -> LifecycleEvent:
        return self.event(ExecutionStatus.RUNNING, worker_id=worker_id, dispatch_id="d1")

    def completed(self, result: Any = None, worker_id: str = "worker-1") -> LifecycleEvent:
        return self.event(
            ExecutionStatus.COMPLETED,
            worker_id=worker_id,
            dispatch_id="d1",
            result=result if result is not None else {"done": self.execution_id},
        )

    def failed(self, message: str = "boom") -> LifecycleEvent:
        return self.event(
            ExecutionStatus.FAILED,
            worker_id="worker-1",
            dispatch_id="d1",
            error=ErrorInfo(type="ValueError", message=message, traceback="Traceback ..."),
        )

    def lifecycle(self) -> list[LifecycleEvent]:
        """admitted → running → completed, in order."""
        return [self.admitted(), self.running(), self.completed()]


async def count_completed(store: ExecutionStore, runs: list[Run]) -> int:
    """How many of ``runs`` the store has as completed."""
    done = 0
    for run in runs:
        record = await store.get(run.project_id, run.execution_id)
        if record is not None and record.status == ExecutionStatus.COMPLETED:
            done += 1
    return done


async def all_completed(store: ExecutionStore, runs: list[Run]) -> bool:
    return await count_completed(store, runs) == len(runs)


async def publish_events(
    connection: AbstractConnection, events: Sequence[LifecycleEvent], *, per_message: int = 10
) -> None:
    """Publish as the dispatcher does: in batches of a project (``per_message`` events
    each), persistent, to ``polos.events``, confirmed."""
    messages = []
    for start in range(0, len(events), per_message):
        chunk = events[start : start + per_message]
        for project in dict.fromkeys(e.project_id for e in chunk):
            bodies = [encode(e) for e in chunk if e.project_id == project]
            messages.append((event_batch_routing_key(project), encode_event_batch(bodies)))
    await publish_raw(connection, messages)


def single_event_key(event: LifecycleEvent) -> str:
    """The routing key a single event had before batches (still accepted by the recorder)."""
    return event_routing_key(
        event.project_id, event.queue_name, event.workflow_id, event.execution_id
    )


async def publish_raw(
    connection: AbstractConnection, messages: Sequence[tuple[str, bytes]]
) -> None:
    async with connection.channel(publisher_confirms=True) as channel:
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key,
                )
                for routing_key, body in messages
            )
        )


def recorder_settings(broker_url: str, uid: str, **overrides: Any) -> RecorderSettings:
    """A recorder of this test's own: its queue gets only the events of project ``uid``."""
    values: dict[str, Any] = {
        "amqp_url": broker_url,
        "redis_url": redis_url(),
        "redis_key_prefix": f"test:{uid}:",
        "redis_timeout_seconds": 0.5,
        "recorder_queue": f"polos.recorder.{uid}",
        "recorder_binding_key": f"{uid}.#",
        "recorder_prefetch": 100,
        "recorder_batch_size": 50,
        "recorder_retry_initial_seconds": 0.05,
        "recorder_retry_max_seconds": 0.2,
        "shutdown_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return RecorderSettings(**values)


RecorderFactory = Callable[..., Awaitable[Recorder]]


@asynccontextmanager
async def recorders(
    broker_url: str, uid: str, delete_queue: Callable[[str], None]
) -> AsyncIterator[RecorderFactory]:
    """Start recorders (settings overridable); every one still running is stopped at the end."""
    started: list[Recorder] = []

    async def make(**overrides: Any) -> Recorder:
        settings = recorder_settings(broker_url, uid, **overrides)
        delete_queue(settings.recorder_queue)
        recorder = Recorder(settings)
        await recorder.start()
        started.append(recorder)
        return recorder

    try:
        yield make
    finally:
        for recorder in started:
            await recorder.stop(timeout=1.0)
