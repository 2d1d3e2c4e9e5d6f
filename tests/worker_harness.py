"""Playing the dispatcher's part in worker tests: publish work, read results, cancel.

The worker is tested on the wire protocol alone (``schemas.dispatch``), so
these tests do not depend on the dispatcher's implementation. The fixtures here
(``dispatcher``, ``run_worker``, ``start_worker``) are registered for every test by
tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from broker.deadletter import SOURCE_HEADER
from broker.topology import (
    declare_dead_letters,
    declare_dispatch_exchanges,
    declare_results_queue,
    declare_work_queue,
)
from schemas.dispatch import (
    DEFAULT_LEASE_SECONDS,
    CancelMessage,
    Heartbeat,
    LoneReport,
    decode_reports,
    encode,
    encode_work,
)
from schemas.ids import new_execution_id, now_rfc3339
from schemas.topology import CANCEL_EXCHANGE, DEAD_LETTER_QUEUE, results_queue, work_queue
from tests.envelopes import make_submission
from tests.proxy import TcpProxy
from tests.workflows import add_workflows
from worker import Handler, Worker

ROOT = Path(__file__).resolve().parent.parent


class FakeDispatcher:
    """Owns the results queue of one submission queue, like the real dispatcher."""

    def __init__(
        self, connection: AbstractConnection, project: str, deployment: str, queue_name: str = "q"
    ) -> None:
        self.connection = connection
        self.project = project
        self.deployment = deployment
        self.queue_name = queue_name
        self.work_queue = work_queue(project, deployment)
        self.results_queue = results_queue(project, queue_name)
        self.results: list[LoneReport] = []
        self.received: list[float] = []
        """Monotonic arrival time of each of ``results``."""
        self.messages = 0
        self.result_messages = 0  # messages carrying a result (not heartbeats only)
        """Messages received (a worker's ``Results`` batch is one, for all it carries)."""
        self._arrived = asyncio.Condition()
        self._channel: AbstractChannel | None = None

    async def open(self) -> None:
        await declare_results_queue(self.connection, self.results_queue)
        await declare_work_queue(self.connection, self.work_queue)
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        await declare_dispatch_exchanges(channel)
        await declare_dead_letters(self.connection)
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(self.results_queue, passive=True)
        await queue.consume(self._on_result)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        async with self._arrived:
            reports = decode_reports(message.body)
            self.messages += 1
            if any(not isinstance(r, Heartbeat) for r in reports):
                self.result_messages += 1
            self.results.extend(reports)
            self.received.extend(time.monotonic() for _ in reports)
            self._arrived.notify_all()

    # -- work -----------------------------------------------------------------------

    def work(
        self,
        workflow_id: str,
        payload: Any = None,
        *,
        deadline: float | None = None,
        execution_id: str | None = None,
        dispatch_id: str | None = None,
        results_queue: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retry_count: int = 0,
        **submission: Any,
    ) -> tuple[str, bytes]:
        """An execution id and the body of a work message for it."""
        if execution_id is None:
            execution_id, created_at = new_execution_id()
        else:
            created_at = now_rfc3339()
        fields: dict[str, Any] = {
            "project_id": self.project,
            "workflow_id": workflow_id,
            "deployment_id": self.deployment,
            "queue_name": self.queue_name,
            "payload": payload,
            "session_id": f"s-{execution_id}",
            "submitted_by": "key_test",
            **submission,
        }
        body = encode_work(
            dispatch_id=dispatch_id or uuid.uuid4().hex,
            deadline=deadline if deadline is not None else time.time() + 60,
            results_queue=results_queue or self.results_queue,
            submission_raw=make_submission(
                execution_id=execution_id, created_at=created_at, **fields
            ),
            lease_seconds=lease_seconds,
            retry_count=retry_count,
            dispatch_count=retry_count + 1,
        )
        return execution_id, body

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None:
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id or uuid.uuid4().hex,
                content_type="application/json",
            ),
            routing_key=self.work_queue,
            mandatory=True,
        )

    async def dispatch(self, workflow_id: str, payload: Any = None, **kwargs: Any) -> str:
        """Publish a work message; returns its execution id."""
        execution_id, body = self.work(workflow_id, payload, **kwargs)
        await self.publish(body)
        return execution_id

    async def cancel(
        self,
        execution_id: str,
        reason: Literal["timeout", "user", "superseded"] = "user",
        *,
        dispatch_id: str | None = None,
    ) -> None:
        assert self._channel is not None
        exchange = await self._channel.get_exchange(CANCEL_EXCHANGE, ensure=False)
        cancel = CancelMessage(
            execution_id=execution_id,
            reason=reason,
            at=now_rfc3339(),
            dispatch_id=dispatch_id,
        )
        await exchange.publish(aio_pika.Message(encode(cancel)), routing_key=self.work_queue)

    # -- results --------------------------------------------------------------------

    def results_of(self, execution_id: str) -> list[LoneReport]:
        return [
            r
            for r in self.results
            if not isinstance(r, Heartbeat) and r.execution_id == execution_id
        ]

    def heartbeats_of(self, execution_id: str) -> list[tuple[float, Heartbeat]]:
        """The heartbeats that carried ``execution_id``, with their arrival times."""
        return [
            (at, r)
            for at, r in zip(self.received, self.results, strict=True)
            if isinstance(r, Heartbeat)
            and any(entry.execution_id == execution_id for entry in r.executions)
        ]

    async def wait_for_heartbeat(
        self, execution_id: str, *, count: int = 1, timeout: float = 10.0
    ) -> Heartbeat:
        """The ``count``-th heartbeat carrying ``execution_id``."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: len(self.heartbeats_of(execution_id)) >= count)
        except TimeoutError:
            raise AssertionError(
                f"{len(self.heartbeats_of(execution_id))} heartbeats for {execution_id} "
                f"in {timeout}s, expected {count}"
            ) from None
        return self.heartbeats_of(execution_id)[count - 1][1]

    async def wait_for(self, execution_id: str, kind: str, *, timeout: float = 10.0) -> LoneReport:
        """The first result of ``kind`` for ``execution_id``; fails if none arrives in time."""

        def found() -> LoneReport | None:
            for result in self.results_of(execution_id):
                if result.type == kind:
                    return result
            return None

        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: found() is not None)
        except TimeoutError:
            seen = [r.type for r in self.results_of(execution_id)]
            raise AssertionError(
                f"no {kind} for {execution_id} in {timeout}s (saw {seen})"
            ) from None
        result = found()
        assert result is not None
        return result


async def until(condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"condition not met within {timeout}s") from None


async def take_dead_letters(
    connection: AbstractConnection, source_queue: str, *, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    """Remove and return the dead letters that came from ``source_queue``.

    ``polos.dead`` is shared by every test: read everything it holds now, ack
    only ours, and leave the others in place (they are requeued when the
    channel closes, never acknowledged).
    """
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        present = queue.declaration_result.message_count or 0
        if present == 0:
            return []
        await channel.set_qos(prefetch_count=min(present, 10_000))
        ours: list[AbstractIncomingMessage] = []
        seen = 0
        done = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            if (message.headers or {}).get(SOURCE_HEADER) == source_queue:
                await message.ack()
                ours.append(message)
            if seen >= present:
                done.set()

        await queue.consume(on_message)
        try:
            async with asyncio.timeout(timeout):
                await done.wait()
        except TimeoutError:
            raise AssertionError(f"read {seen} of {present} dead letters") from None
        return ours
    finally:
        await channel.close()


def worker_process(
    amqp_url: str,
    project: str,
    deployment: str,
    log: Path,
    *args: str,
    target: str = "tests.workflows:make_worker",
    **env: str,
) -> subprocess.Popen[bytes]:
    """``python -m worker [args] target`` for ``project``/``deployment``, logging to ``log``."""
    with log.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", *args, target],
            cwd=ROOT,
            env={
                **os.environ,
                "POLOS_AMQP_URL": amqp_url,
                "POLOS_TEST_PROJECT": project,
                "POLOS_TEST_DEPLOYMENT": deployment,
                **env,
            },
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
async def dispatcher(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> AsyncIterator[FakeDispatcher]:
    """The dispatcher's part for deployment ``v1`` of the test's project (``uid``)."""
    fake = FakeDispatcher(amqp, uid, "v1")
    delete_queues(fake.results_queue)
    delete_queues(fake.work_queue)
    await fake.open()
    yield fake
    await fake.close()


RunWorker = Callable[[Worker], Awaitable[Worker]]


@pytest.fixture
async def run_worker() -> AsyncIterator[RunWorker]:
    """``await run_worker(worker)``: ``worker`` started; every one is stopped at the end."""
    workers: list[Worker] = []

    async def _run(worker: Worker) -> Worker:
        await worker.start()
        workers.append(worker)
        return worker

    yield _run
    for worker in workers:
        await worker.stop(drain_timeout=0)


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def start_worker(amqp_url: str, uid: str, run_worker: RunWorker) -> StartWorker:
    """``start_worker({"id": handler}, url=..., **Worker kwargs)``: a started in-process
    worker of deployment ``v1`` with tests/workflows.py's workflows and the given ones."""

    async def _start(
        workflows: dict[str, Handler] | None = None, *, url: str | None = None, **kwargs: Any
    ) -> Worker:
        worker = add_workflows(
            Worker(project=uid, deployment="v1", amqp_url=url or amqp_url, **kwargs)
        )
        for workflow_id, handler in (workflows or {}).items():
            worker.add_workflow(workflow_id, handler)
        return await run_worker(worker)

    return _start


def proxied(broker_proxy: TcpProxy, amqp_url: str) -> str:
    """The broker through ``broker_proxy``, reconnecting every 0.2 s once it is cut."""
    # aio-pika reads the robust reconnect interval from the URL.
    return f"{broker_proxy.url(amqp_url)}?reconnect_interval=0.2"
