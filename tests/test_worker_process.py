"""``python -m worker`` processes: killed mid-run, stopped with SIGTERM, burst mode."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from schemas.dispatch import Completed, Released
from tests.conftest import has_depth, queue_depth
from tests.worker_harness import FakeDispatcher, until, worker_process

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn(amqp_url: str, uid: str, tmp_path: Path) -> Iterator[Spawn]:
    """Start worker processes for this test's project; any left running are killed."""
    processes: list[subprocess.Popen[bytes]] = []

    def _spawn(
        *args: str, target: str = "tests.workflows:make_worker", **env: str
    ) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(processes)}.log"
        process = worker_process(amqp_url, uid, "v1", log, *args, target=target, **env)
        processes.append(process)
        return process

    yield _spawn
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


async def exit_code(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    try:
        return await asyncio.to_thread(process.wait, timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {process.pid} still running after {timeout}s") from None


async def test_unreported_execution_of_a_killed_worker_is_redelivered_and_completes(
    dispatcher: FakeDispatcher, spawn: Spawn, amqp: AbstractConnection
) -> None:
    # Never reported running, so its delivery is still unacknowledged. (A
    # leased one is dispatched again by its owner once the lease expires.)
    first = spawn(POLOS_WORKER_RUNNING_DELAY_SECONDS="30")
    execution_id = await dispatcher.dispatch("slow_first")
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 0), timeout=15)
    await asyncio.sleep(0.2)  # it is running

    first.kill()
    await exit_code(first)
    second = spawn("--burst")

    completed = await dispatcher.wait_for(execution_id, "completed", timeout=15)
    assert isinstance(completed, Completed)
    assert completed.result["redelivered"] is True
    assert await exit_code(second) == 0
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_sigterm_lets_running_executions_finish_and_takes_no_more(
    dispatcher: FakeDispatcher, spawn: Spawn, amqp: AbstractConnection
) -> None:
    worker = spawn(POLOS_WORKER_CONCURRENCY="1")
    first = await dispatcher.dispatch("sleep", {"seconds": 1, "result": "slept"})
    waiting = await dispatcher.dispatch("echo", "not taken")
    await dispatcher.wait_for_heartbeat(first, timeout=15)

    worker.send_signal(signal.SIGTERM)

    completed = await dispatcher.wait_for(first, "completed")
    assert isinstance(completed, Completed)
    assert completed.result == "slept"
    assert await exit_code(worker) == 0
    assert dispatcher.results_of(waiting) == []
    assert await queue_depth(amqp, dispatcher.work_queue) == 1


async def test_sigterm_releases_a_leased_execution_that_outlives_the_drain_timeout(
    dispatcher: FakeDispatcher, spawn: Spawn, amqp: AbstractConnection
) -> None:
    worker = spawn(POLOS_WORKER_DRAIN_TIMEOUT_SECONDS="0.3")
    execution_id = await dispatcher.dispatch("slow_first", dispatch_id="d-1")
    await dispatcher.wait_for_heartbeat(execution_id, timeout=15)

    worker.send_signal(signal.SIGTERM)

    assert await exit_code(worker) == 0
    released = await dispatcher.wait_for(execution_id, "released")
    assert isinstance(released, Released)
    assert (released.dispatch_id, released.reason) == ("d-1", "shutdown")
    assert [r.type for r in dispatcher.results_of(execution_id)] == ["released"]
    # Its delivery was acknowledged: the owner dispatches it again, not the broker.
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_sigterm_hands_back_an_unreported_execution_that_outlives_the_drain_timeout(
    dispatcher: FakeDispatcher, spawn: Spawn, amqp: AbstractConnection
) -> None:
    worker = spawn(
        POLOS_WORKER_DRAIN_TIMEOUT_SECONDS="0.3", POLOS_WORKER_RUNNING_DELAY_SECONDS="30"
    )
    execution_id = await dispatcher.dispatch("slow_first")
    await until(lambda: has_depth(amqp, dispatcher.work_queue, 0), timeout=15)
    await asyncio.sleep(0.2)  # it is running

    worker.send_signal(signal.SIGTERM)

    assert await exit_code(worker) == 0
    assert dispatcher.results_of(execution_id) == []
    assert await queue_depth(amqp, dispatcher.work_queue) == 1

    # Handed back, not lost: the next worker runs it (and sees it was delivered before).
    burst = spawn("--burst")
    completed = await dispatcher.wait_for(execution_id, "completed", timeout=15)
    assert isinstance(completed, Completed)
    assert completed.result["redelivered"] is True
    assert await exit_code(burst) == 0
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_example_fleet_in_burst_mode_greets_and_exits(
    dispatcher: FakeDispatcher, spawn: Spawn, uid: str, amqp: AbstractConnection
) -> None:
    execution_id = await dispatcher.dispatch("hello", {"name": "Ada"})

    burst = spawn(
        "--burst",
        target="examples.hello_worker:worker",
        POLOS_DEV_PROJECT=uid,
        POLOS_DEV_DEPLOYMENT="v1",
    )

    completed = await dispatcher.wait_for(execution_id, "completed", timeout=15)
    assert isinstance(completed, Completed)
    assert completed.result == {"greeting": "Hello, Ada!", "execution_id": execution_id}
    assert await exit_code(burst) == 0
    assert await queue_depth(amqp, dispatcher.work_queue) == 0
