"""Driving the dispatcher in tests.

- ``QueueKit``: submission queues declared the way the gateway declares them
  (quorum, single active consumer) and recorded in the registry, and
  submissions published straight to them with a confirm;
- ``EventLog``: the lifecycle events of one project, as a follower sees them;
- ``Probe`` + ``probe_worker``: an in-process worker (the SDK) whose workflow
  measures how many executions run at once, and which ones were cancelled;
- ``dispatcher_process``: ``python -m dispatcher`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryWriter, declare_registry
from broker.topology import declare_dead_letters, declare_dispatch_exchanges, declare_queue
from schemas.dispatch import TERMINAL_STATUSES, ExecutionStatus, LifecycleEvent, decode_events
from schemas.envelope import with_queue_config
from schemas.ids import new_execution_id, now_rfc3339
from schemas.registry import ConcurrencyStrategy, QueueDeclared, QueueLimitSet, QueueStrategySet
from schemas.topology import (
    EVENTS_EXCHANGE,
    results_queue,
    submit_queue,
    submit_queue_arguments,
    work_queue,
)
from tests.envelopes import make_submission
from worker import ExecutionContext, Worker

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = "v1"


class QueueKit:
    """The submission queues of one test project."""

    def __init__(self, connection: AbstractConnection, project: str) -> None:
        self.connection = connection
        self.project = project
        self.deployment = DEPLOYMENT
        self._publisher = ConfirmedPublisher(connection, confirm_timeout=10.0, channels=1)
        self._writer = RegistryWriter(self._publisher)
        self._queues: set[str] = set()

    async def open(self) -> None:
        await self._publisher.start()
        await declare_dead_letters(self.connection)
        # A test session's own vhost has no registry until something declares it.
        await declare_registry(self.connection)
        async with self.connection.channel() as channel:
            await declare_dispatch_exchanges(channel)

    async def close(self) -> None:
        await self._publisher.close()
        names = [work_queue(self.project, self.deployment)]
        for queue in self._queues:
            names += [submit_queue(self.project, queue), results_queue(self.project, queue)]
        for name in names:
            with contextlib.suppress(Exception):
                async with self.connection.channel() as channel:
                    await channel.queue_delete(name)

    async def declare(
        self,
        queue: str,
        *,
        limit: int | None = None,
        strategy: ConcurrencyStrategy | None = None,
    ) -> str:
        """Declare the queue as the gateway does and append ``queue_declared``."""
        name = submit_queue(self.project, queue)
        await declare_queue(self.connection, name, submit_queue_arguments(max_length=100_000))
        self._queues.add(queue)
        await self._writer.append(
            QueueDeclared(
                at=now_rfc3339(),
                project_id=self.project,
                queue_name=queue,
                concurrency_limit=limit,
                concurrency_strategy=strategy,
            )
        )
        return name

    async def set_strategy(self, queue: str, strategy: ConcurrencyStrategy) -> None:
        await self._writer.append(
            QueueStrategySet(
                at=now_rfc3339(),
                project_id=self.project,
                queue_name=queue,
                concurrency_strategy=strategy,
            )
        )

    async def set_limit(self, queue: str, limit: int, *, event_id: str | None = None) -> str:
        """Append ``queue_limit_set``; returns the event's id."""
        return await self._writer.append(
            QueueLimitSet(
                at=now_rfc3339(), project_id=self.project, queue_name=queue, concurrency_limit=limit
            ),
            event_id=event_id,
        )

    async def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        workflow: str = "sleep",
        key: str | None = None,
        run_timeout: int = 60,
        limit: int | None = None,
        config_id: str | None = None,
    ) -> str:
        """Publish one submission (confirmed); returns its execution id.

        ``limit`` and ``config_id``: what the gateway stamps on a submission that
        carries a limit (the registry event that recorded it)."""
        execution_id, created_at = new_execution_id()
        body = make_submission(
            execution_id=execution_id,
            created_at=created_at,
            project_id=self.project,
            workflow_id=workflow,
            deployment_id=self.deployment,
            queue_name=queue,
            concurrency_key=key,
            run_timeout_seconds=run_timeout,
            payload=payload,
            session_id=str(uuid.uuid4()),
            submitted_by="key_test",
            queue_concurrency_limit=limit,
        )
        if config_id is not None:
            body = with_queue_config(body, config_id)
        await self.publish_raw(queue, body, message_id=execution_id)
        return execution_id

    async def publish_to(self, name: str, body: bytes) -> None:
        """Publish ``body`` to the queue named ``name`` (a results queue: a cancel request)."""
        await self._publisher.publish(name, body, message_id=uuid.uuid4().hex)

    async def publish_raw(self, queue: str, body: bytes, *, message_id: str = "") -> None:
        await self._publisher.publish(
            submit_queue(self.project, queue), body, message_id=message_id or uuid.uuid4().hex
        )


class EventLog:
    """Every lifecycle event of one project, in the order they arrive."""

    def __init__(self, connection: AbstractConnection, project: str) -> None:
        self.connection = connection
        self.project = project
        self.events: list[LifecycleEvent] = []
        self.arrived_at: list[float] = []  # monotonic time each event arrived
        self.batches: list[list[LifecycleEvent]] = []  # the messages they came in
        self._changed = asyncio.Condition()
        self._channel: AbstractChannel | None = None

    async def open(self) -> None:
        channel = self._channel = await self.connection.channel()
        await declare_dispatch_exchanges(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key=f"{self.project}.#")
        await queue.consume(self._on_event, no_ack=True)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        decoded = decode_events(message.body)
        assert not decoded.rejected, decoded.rejected
        async with self._changed:
            now = time.monotonic()
            for event, _raw in decoded.events:
                self.events.append(event)
                self.arrived_at.append(now)
            self.batches.append([event for event, _raw in decoded.events])
            self._changed.notify_all()

    @property
    def messages(self) -> int:
        return len(self.batches)

    def of(self, execution_id: str) -> list[LifecycleEvent]:
        return [e for e in self.events if e.execution_id == execution_id]

    def statuses(self, execution_id: str) -> list[ExecutionStatus]:
        return [e.status for e in self.of(execution_id)]

    def terminal(self, execution_id: str) -> list[LifecycleEvent]:
        return [e for e in self.of(execution_id) if e.status in TERMINAL_STATUSES]

    def first(self, execution_id: str, status: ExecutionStatus) -> LifecycleEvent:
        return next(e for e in self.of(execution_id) if e.status is status)

    def arrival(self, execution_id: str, status: ExecutionStatus) -> float:
        for event, at in zip(self.events, self.arrived_at, strict=True):
            if event.execution_id == execution_id and event.status is status:
                return at
        raise AssertionError(f"no {status} event for {execution_id}")

    async def wait_for(
        self, predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "events"
    ) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            seen = [(e.execution_id[-6:], e.status.value) for e in self.events[-30:]]
            raise AssertionError(f"timed out waiting for {what}; last events: {seen}") from None

    async def wait_status(
        self, execution_id: str, status: ExecutionStatus, *, timeout: float = 10.0
    ) -> LifecycleEvent:
        await self.wait_for(
            lambda: status in self.statuses(execution_id),
            timeout=timeout,
            what=f"{status} of {execution_id}",
        )
        return self.first(execution_id, status)

    async def wait_terminal(
        self, execution_ids: list[str], *, timeout: float = 20.0
    ) -> dict[str, LifecycleEvent]:
        await self.wait_for(
            lambda: all(self.terminal(e) for e in execution_ids),
            timeout=timeout,
            what=f"{len(execution_ids)} terminal executions "
            f"({sum(1 for e in execution_ids if self.terminal(e))} so far)",
        )
        return {e: self.terminal(e)[0] for e in execution_ids}


class Probe:
    """What the workers saw: executions running at once, and which were cancelled."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.max_running = 0
        self.runs: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []  # ran to their end (returned)
        self.running_in: dict[str, set[str]] = {}  # by queue name
        self.max_running_in: dict[str, int] = {}
        self.running_by_key: dict[str | None, set[str]] = {}  # by concurrency key
        self.max_running_by_key: dict[str | None, int] = {}

    async def sleep(self, ctx: ExecutionContext, payload: Any) -> Any:
        """Runs ``payload["seconds"]`` (default 0.2), counting itself while it does."""
        seconds = float((payload or {}).get("seconds", 0.2))
        in_queue = self.running_in.setdefault(ctx.queue_name, set())
        by_key = self.running_by_key.setdefault(ctx.concurrency_key, set())
        self.running.add(ctx.execution_id)
        in_queue.add(ctx.execution_id)
        by_key.add(ctx.execution_id)
        self.runs.append(ctx.execution_id)
        self.max_running = max(self.max_running, len(self.running))
        self.max_running_in[ctx.queue_name] = max(
            self.max_running_in.get(ctx.queue_name, 0), len(in_queue)
        )
        self.max_running_by_key[ctx.concurrency_key] = max(
            self.max_running_by_key.get(ctx.concurrency_key, 0), len(by_key)
        )
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append(ctx.execution_id)
            raise
        finally:
            self.running.discard(ctx.execution_id)
            in_queue.discard(ctx.execution_id)
            by_key.discard(ctx.execution_id)
        self.finished.append(ctx.execution_id)
        return {"slept": seconds}


def probe_worker(amqp_url: str, project: str, probe: Probe, *, concurrency: int = 32) -> Worker:
    worker = Worker(
        project=project, deployment=DEPLOYMENT, concurrency=concurrency, amqp_url=amqp_url
    )
    worker.add_workflow("sleep", probe.sleep)
    return worker


def dispatcher_process(
    amqp_url: str, project: str, log: Path, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """``python -m dispatcher [args]`` owning ``<project>/*``, logging to ``log``."""
    with log.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *args],
            cwd=ROOT,
            env={
                **os.environ,
                "POLOS_AMQP_URL": amqp_url,
                "POLOS_DISPATCHER_QUEUES": f"{project}/*",
                **env,
            },
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def until(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str) -> None:
    """Poll ``predicate`` (for state no event announces) until true; fail after ``timeout``."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


async def wait_for_log(log: Path, text: str, *, timeout: float = 15.0, count: int = 1) -> None:
    """Until ``text`` appears ``count`` times in ``log``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if read_log(log).count(text) >= count:
            return
        await asyncio.sleep(0.05)
    tail = read_log(log)[-3000:]
    raise AssertionError(f"{text!r} not in {log.name} after {timeout}s:\n{tail}")


async def _nothing() -> AsyncIterator[Any]:
    return
    yield


async def in_flight_per_ledger(connection: AbstractConnection, queue_name: str) -> set[str]:
    """What the ledger left on a results queue says is still in flight (or pending).

    Reads (and takes) every message left there, as a new owner would: it must all
    be ledger records, and their fold is what the next owner would rebuild.
    """
    from dispatcher.lifecycle import QueueLifecycle, Tunables
    from schemas.dispatch import LedgerRecord, decode_results_queue

    channel = await connection.channel()
    records: list[tuple[int, LedgerRecord]] = []
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        left = queue.declaration_result.message_count or 0
        # A consumer, not basic.get: quorum queues with single active consumer refuse it.
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages if left else _nothing():
                decoded = decode_results_queue(message.body)
                assert isinstance(decoded, LedgerRecord), f"not a ledger record: {decoded!r}"
                records.append((len(records), decoded))
                if len(records) == left:
                    break
    finally:
        await channel.close()
    lifecycle = QueueLifecycle(None, Tunables(), owner="test")
    lifecycle.rebuild(records, time.time())
    return set(lifecycle.executions)
