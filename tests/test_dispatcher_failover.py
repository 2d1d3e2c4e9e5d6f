"""Ownership across processes: ``python -m dispatcher`` twice, one owner at a time.

kill -9 of the owner under load: the standby takes over within 5 s, every
submission reaches a terminal state exactly once, and the limit holds across
the takeover (in-flight executions keep their slots and are not dispatched
again). SIGTERM: the owner drains and hands over without loss. A lost
connection: the dispatcher rebuilds itself and recovers what it held.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from schemas.dispatch import ExecutionStatus
from tests.conftest import DispatcherFactory
from tests.dispatcher_support import (
    EventLog,
    Probe,
    QueueKit,
    dispatcher_process,
    probe_worker,
    read_log,
    wait_for_log,
)
from tests.proxy import TcpProxy
from worker import Worker

S = ExecutionStatus
OWNING = "we own it now"
READY = "dispatcher ready"


class Spawned:
    """A ``python -m dispatcher`` process of the test's project and its log."""

    def __init__(self, amqp_url: str, project: str, log: Path) -> None:
        self.log = log
        self.process = dispatcher_process(amqp_url, project, log)

    @property
    def output(self) -> str:
        return read_log(self.log)


@pytest.fixture
def spawn(amqp_url: str, uid: str, tmp_path: Path) -> Iterator[Callable[[str], Spawned]]:
    started: list[Spawned] = []

    def _spawn(name: str) -> Spawned:
        started.append(Spawned(amqp_url, uid, tmp_path / f"dispatcher-{name}.log"))
        return started[-1]

    yield _spawn
    for spawned in started:
        if spawned.process.poll() is None:
            spawned.process.kill()
            spawned.process.wait(timeout=10)


@pytest.fixture
async def workers(amqp_url: str, uid: str) -> AsyncIterator[Probe]:
    """Two in-process SDK workers sharing one probe: what the fleet runs at once."""
    probe = Probe()
    fleet: list[Worker] = [probe_worker(amqp_url, uid, probe, concurrency=8) for _ in range(2)]
    for worker in fleet:
        await worker.start()
    yield probe
    for worker in fleet:
        await worker.stop(drain_timeout=0)


async def _owner_and_standby(spawn: Callable[[str], Spawned]) -> tuple[Spawned, Spawned]:
    # The first to consume is the active one (single active consumer).
    owner = spawn("a")
    await wait_for_log(owner.log, READY)
    standby = spawn("b")
    await wait_for_log(standby.log, READY)
    return owner, standby


def _completed_once(event_log: EventLog, ids: list[str]) -> None:
    """Each execution reached one terminal outcome: completed, by one dispatch.

    Events are at-least-once: an owner killed after publishing a terminal event
    but before acknowledging leaves the result to its successor, which repeats
    the (same) event; followers key events by execution and status.
    """
    for execution_id in ids:
        outcomes = {(e.status, e.dispatch_id) for e in event_log.terminal(execution_id)}
        assert len(outcomes) == 1, (execution_id, outcomes)
        [(status, _)] = outcomes
        assert status is S.COMPLETED, (execution_id, event_log.statuses(execution_id))


def _first_admitted_after(event_log: EventLog, since: float) -> float | None:
    for event, at in zip(event_log.events, event_log.arrived_at, strict=True):
        if event.status is S.ADMITTED and at > since:
            return at
    return None


async def test_kill_9_of_the_owner_under_load_a_standby_takes_over(
    queue_kit: QueueKit,
    event_log: EventLog,
    workers: Probe,
    spawn: Callable[[str], Spawned],
) -> None:
    probe = workers
    await queue_kit.declare("q", limit=3)
    owner, standby = await _owner_and_standby(spawn)
    ids = [await queue_kit.submit("q", {"seconds": 0.3}, run_timeout=20) for _ in range(40)]
    await event_log.wait_for(
        lambda: sum(1 for e in ids if event_log.terminal(e)) >= 8, what="8 completed"
    )
    assert OWNING in owner.output
    assert OWNING not in standby.output
    # Under load: executions in flight when it dies.
    await event_log.wait_for(lambda: bool(probe.running), what="executions running")

    owner.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await wait_for_log(standby.log, OWNING, timeout=5)
    await event_log.wait_for(
        lambda: _first_admitted_after(event_log, killed_at) is not None,
        timeout=5,
        what="an admission by the new owner",
    )
    taken_over_at = _first_admitted_after(event_log, killed_at)
    assert taken_over_at is not None
    assert taken_over_at - killed_at < 5.0

    await event_log.wait_terminal(ids, timeout=30)
    _completed_once(event_log, ids)
    assert probe.max_running == 3
    # What ran when the owner died kept its slot and ran on: nothing ran twice.
    assert sorted(probe.runs) == sorted(ids)


async def test_sigterm_drains_and_hands_over_without_loss(
    queue_kit: QueueKit,
    event_log: EventLog,
    workers: Probe,
    spawn: Callable[[str], Spawned],
) -> None:
    probe = workers
    await queue_kit.declare("q", limit=2)
    owner, standby = await _owner_and_standby(spawn)
    ids = [await queue_kit.submit("q", {"seconds": 0.3}, run_timeout=20) for _ in range(16)]
    await event_log.wait_for(
        lambda: sum(1 for e in ids if event_log.terminal(e)) >= 4, what="4 completed"
    )

    owner.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    # It lets what it admitted finish (0.3 s runs), then exits.
    assert await asyncio.to_thread(owner.process.wait, 10) == 0
    assert time.monotonic() - stopped_at < 3
    assert "draining" in owner.output
    # One SIGTERM drains to the end: nothing is cut short and handed over half-run.
    assert "still in flight" not in owner.output
    await wait_for_log(standby.log, OWNING, timeout=5)

    await event_log.wait_terminal(ids, timeout=30)
    _completed_once(event_log, ids)
    assert probe.max_running == 2
    assert sorted(probe.runs) == sorted(ids)  # handed over: none ran twice


async def test_lost_connection_is_rebuilt_and_nothing_is_lost_or_run_twice(
    queue_kit: QueueKit,
    event_log: EventLog,
    workers: Probe,
    broker_proxy: TcpProxy,
    make_dispatcher: DispatcherFactory,
    amqp_url: str,
) -> None:
    probe = workers
    await queue_kit.declare("q", limit=2)
    dispatcher = await make_dispatcher(amqp_url=broker_proxy.url(amqp_url))
    ids = [await queue_kit.submit("q", {"seconds": 0.3}, run_timeout=20) for _ in range(12)]
    await event_log.wait_for(lambda: bool(probe.running), what="executions running")

    # The path to the broker dies: the broker requeues what the dispatcher
    # held; the dispatcher builds a new session and recovers it from there.
    broker_proxy.cut()
    await asyncio.sleep(0.5)
    broker_proxy.restore()

    await event_log.wait_terminal(ids, timeout=30)
    _completed_once(event_log, ids)
    assert dispatcher.sessions == 2
    assert probe.max_running == 2
    assert sorted(probe.runs) == sorted(ids)
