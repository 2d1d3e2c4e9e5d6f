"""The whole system on broker nodes of a test's own, a steady load, and its accounting.

For broker faults (G8: a restart of the node; G9: the loss of a cluster node):

- ``running_stack``: gateway, two dispatchers (owner and standby), a worker and
  a recorder, in this process, each given the broker nodes in an order of its
  own (as a deployment spreads its connections over a cluster);
- ``Load``: submissions over HTTP at a steady rate, every answer kept with its time;
- ``Accounting``: every 200 must reach a terminal record that agrees with what ran,
  no queue's limit may be exceeded, refusals must not last long.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.registry import register_deployment
from dispatcher import Dispatcher
from dispatcher import Settings as DispatcherSettings
from gateway.context import APP_LINK
from gateway.settings import Settings
from recorder import Recorder
from schemas.dispatch import TERMINAL_STATUSES, ExecutionStatus
from store import ExecutionStore
from tests.conftest import Tenant, new_tenant, running_gateway
from tests.dispatcher_support import DEPLOYMENT, Probe
from tests.store_support import eventually, recorder_settings, redis_client, redis_url
from worker import Worker

Client = TestClient[web.Request, web.Application]
QUEUE = "steady"
LIMIT = 4
# The fault tests' rounds: 1 in CI (bounded); more for a longer chaos run, e.g.
# POLOS_CHAOS_ROUNDS=10 make pytest PYTEST_ARGS="-m chaos".
CHAOS_ROUNDS = max(1, int(os.environ.get("POLOS_CHAOS_ROUNDS", "1")))
# A recorder that waits for fuller batches, as a busy one finds them: a batch is
# in hand, unacknowledged, whenever the broker goes away.
RECORDER_BATCH_WAIT_SECONDS = 0.25


def rotated(urls: Sequence[str], by: int) -> str:
    """The nodes as one process is given them: all of them, starting at ``by``."""
    shift = by % len(urls)
    return ",".join([*urls[shift:], *urls[:shift]])


@dataclass
class Stack:
    tenant: Tenant
    client: Client
    dispatchers: list[Dispatcher]
    worker: Worker
    recorder: Recorder
    probe: Probe
    store: ExecutionStore

    @property
    def gateway_node(self) -> str:
        """The URL of the node the gateway's connection is on now."""
        connection = self.client.app[APP_LINK].connection
        assert connection is not None
        return str(getattr(connection, "node", ""))

    async def ready(self) -> bool:
        response = await self.client.get("/ready")
        return response.status == 200

    async def every_process_serves(self) -> None:
        """Each process is back by itself: none was restarted by the test."""
        await eventually(self.ready, timeout=20, what="the gateway to be ready again")
        await eventually(
            lambda: any(d.ready.is_set() for d in self.dispatchers),
            timeout=20,
            what="a dispatcher session",
        )
        assert self.recorder.running, "the recorder stopped"


@asynccontextmanager
async def running_stack(urls: Sequence[str], directory: Path) -> AsyncIterator[Stack]:
    tenant = new_tenant(directory / "projects.json")
    project = tenant.project_id
    await register_deployment(rotated(urls, 0), project, DEPLOYMENT, ["sleep"])
    recorder = Recorder(
        recorder_settings(
            rotated(urls, 1),
            project,
            recorder_batch_wait_seconds=RECORDER_BATCH_WAIT_SECONDS,
            shutdown_timeout_seconds=1.0,
        )
    )
    await recorder.start()
    probe = Probe()
    worker = Worker(
        project=project,
        deployment=DEPLOYMENT,
        concurrency=2 * LIMIT,
        amqp_url=rotated(urls, 2),
    )
    worker.add_workflow("sleep", probe.sleep)
    await worker.start()
    dispatchers = [
        Dispatcher(
            DispatcherSettings(amqp_url=rotated(urls, 1 + n), dispatcher_queues=f"{project}/*")
        )
        for n in range(2)
    ]
    for dispatcher in dispatchers:
        await dispatcher.start()
    settings = Settings(
        amqp_url=rotated(urls, 0),
        projects_file=tenant.projects_file,
        confirm_timeout_seconds=3.0,
        redis_url=redis_url(),
        redis_key_prefix=f"test:{project}:",
        redis_timeout_seconds=0.5,
    )
    try:
        async with (
            redis_client(f"test:{project}:") as redis,
            running_gateway(settings) as client,
        ):
            store = ExecutionStore(redis, 3600, key_prefix=f"test:{project}:")
            yield Stack(tenant, client, dispatchers, worker, recorder, probe, store)
    finally:
        for dispatcher in dispatchers:
            await dispatcher.stop(drain=False)
        await worker.stop(drain_timeout=0)
        await recorder.stop(timeout=1.0)


@dataclass
class Answer:
    at: float
    status: int
    execution_id: str | None


@dataclass
class Load:
    """Submissions at ``rate`` per second (a few in flight at once) until stopped."""

    stack: Stack
    rate: float = 40.0
    seconds: float = 0.05  # how long each execution runs
    answers: list[Answer] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and self._task is not None:
            self._task.cancel()
        await self.stop()

    async def stop(self) -> None:
        """Submit nothing more; wait for the answers to what is in flight."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def accepted(self) -> list[str]:
        return [a.execution_id for a in self.answers if a.execution_id is not None]

    def accepted_since(self, since: float) -> int:
        return sum(1 for a in self.answers if a.execution_id is not None and a.at > since)

    def refused_for(self, since: float, until: float | None = None) -> float:
        """The longest stretch, after ``since``, from a refusal to the next 200."""
        longest = 0.0
        first_refusal: float | None = None
        for answer in sorted(self.answers, key=lambda a: a.at):
            if answer.at < since or (until is not None and answer.at > until):
                continue
            if answer.status != 200:
                if first_refusal is None:
                    first_refusal = answer.at
            elif first_refusal is not None:
                longest = max(longest, answer.at - first_refusal)
                first_refusal = None
        if first_refusal is not None:
            longest = max(longest, time.monotonic() - first_refusal)
        return longest

    async def _run(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(16)
        try:
            while not self._stop.is_set():
                await limit.acquire()
                task = asyncio.create_task(self._submit(limit))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1 / self.rate):
                        await self._stop.wait()
            await asyncio.gather(*in_flight)
        except asyncio.CancelledError:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise

    async def _submit(self, limit: asyncio.Semaphore) -> None:
        body = {
            "payload": {"seconds": self.seconds},
            "queue_name": QUEUE,
            "queue_concurrency_limit": LIMIT,
        }
        try:
            response = await self.stack.client.post(
                "/api/v1/workflows/sleep/run",
                json=body,
                headers=self.stack.tenant.headers,
                timeout=aiohttp.ClientTimeout(total=15),
            )
            status = response.status
            execution_id = (await response.json())["execution_id"] if status == 200 else None
            if status != 200:
                await response.read()
        finally:
            limit.release()
        assert status in (200, 503), f"a submission answered {status}"
        self.answers.append(Answer(time.monotonic(), status, execution_id))


def where_they_are(stack: Stack, execution_ids: list[str]) -> str:
    """What each dispatcher (and the worker) holds of these executions now."""
    lines = []
    for n, dispatcher in enumerate(stack.dispatchers):
        session = dispatcher.session
        if session is None:
            lines.append(f"dispatcher {n}: no session")
            continue
        for owner in session.owners.values():
            lc = owner.lifecycle
            lines.append(
                f"dispatcher {n} {owner.name} {owner.state}: held {lc.held} pending {lc.pending}"
                f" announcing {lc.announcing} deliveries {len(owner.deliveries)}"
            )
            for execution_id in execution_ids:
                x = lc.executions.get(execution_id)
                if x is not None:
                    lines.append(
                        f"  {execution_id}: {x.stage} dispatch {x.dispatch_id}"
                        f" lease_until {x.lease_until} submission {x.submission}"
                    )
    running = stack.worker.running
    lines += [f"worker holds {e}" for e in execution_ids if e in running]
    return "\n".join(lines)


async def assert_accounted(
    load: Load,
    stack: Stack,
    *,
    timeout: float = 60.0,
    explain: Callable[[list[str]], Awaitable[str]] | None = None,
) -> None:
    """Every 200 reached a terminal record that agrees with what ran; no limit was broken.

    ``explain`` adds what the test knows (faults, the broker's queues) to a failure."""
    accepted = load.accepted
    assert accepted, "nothing was accepted"
    pending = set(accepted)

    async def all_terminal() -> bool:
        for execution_id in list(pending):
            record = await stack.store.get(stack.tenant.project_id, execution_id)
            if record is not None and record.status in TERMINAL_STATUSES:
                pending.discard(execution_id)
        return not pending

    try:
        await eventually(all_terminal, timeout=timeout, what="every 200 to reach a terminal record")
    except AssertionError:
        sample = sorted(pending)[:5]
        records = [await stack.store.get(stack.tenant.project_id, e) for e in sample]
        ran = stack.probe.runs
        answered = {a.execution_id: a.at for a in load.answers}
        start = load.answers[0].at
        seen = [
            (
                e,
                r.status if r else None,
                f"ran {ran.count(e)}x",
                f"accepted at +{answered[e] - start:.1f}s",
            )
            for e, r in zip(sample, records, strict=True)
        ]
        told = await explain(sample) if explain is not None else ""
        told += where_they_are(stack, sample)
        raise AssertionError(
            f"{len(pending)} of {len(accepted)} accepted executions are not terminal; "
            f"e.g. {seen}\n{told}"
        ) from None
    ran_ids = set(stack.probe.runs)
    for execution_id in accepted:
        record = await stack.store.get(stack.tenant.project_id, execution_id)
        assert record is not None
        assert record.status is ExecutionStatus.COMPLETED, (execution_id, record.status)
        assert execution_id in ran_ids, f"{execution_id} is recorded completed but never ran"
        assert record.result == {"slept": load.seconds}, (execution_id, record.result)
        assert record.started_at is not None, execution_id
        assert record.completed_at is not None, execution_id
        assert record.started_at <= record.completed_at, (execution_id, record)
    assert stack.probe.max_running_in.get(QUEUE, 0) <= LIMIT, stack.probe.max_running_in
