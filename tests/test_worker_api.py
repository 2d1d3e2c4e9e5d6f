"""Mistakes a fleet can make are reported when it builds its worker, not at run time."""

from __future__ import annotations

from typing import Any

import pytest

from worker import (
    DEFAULT_RETRIES,
    Backoff,
    ExecutionContext,
    NonRetryableError,
    RetryPolicy,
    Worker,
)
from worker._cli import load


async def noop(ctx: ExecutionContext, payload: Any) -> Any:
    return None


def test_settings_come_from_arguments_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POLOS_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("POLOS_WORKER_DRAIN_TIMEOUT_SECONDS", "7")
    monkeypatch.setenv("POLOS_AMQP_URL", "amqp://u:p@broker:5672/")

    from_env = Worker(project="acme", deployment="v1")
    explicit = Worker(project="acme", deployment="v1", concurrency=5, amqp_url="amqp://x/")

    assert from_env.concurrency == 3
    assert from_env.settings.worker_drain_timeout_seconds == 7
    assert from_env.settings.amqp_url.get_secret_value() == "amqp://u:p@broker:5672/"
    assert explicit.concurrency == 5
    assert explicit.settings.amqp_url.get_secret_value() == "amqp://x/"
    assert from_env.work_queue == "polos.work.acme.v1"


def test_workflow_decorator_registers_and_returns_the_handler() -> None:
    worker = Worker(project="acme", deployment="v1")

    @worker.workflow("summarize")
    async def summarize(ctx: ExecutionContext, payload: Any) -> Any:
        return payload

    assert dict(worker.workflows) == {"summarize": summarize}


def test_building_mistakes_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid project id"):
        Worker(project="has.dots", deployment="v1")
    with pytest.raises(ValueError, match="concurrency"):
        Worker(project="acme", deployment="v1", concurrency=0)
    worker = Worker(project="acme", deployment="v1")
    worker.add_workflow("a", noop)
    with pytest.raises(ValueError, match="already registered"):
        worker.add_workflow("a", noop)

    def not_async(ctx: ExecutionContext, payload: Any) -> Any:
        return None

    with pytest.raises(TypeError, match="async function"):
        worker.add_workflow("b", not_async)


def test_a_workflow_retries_twice_by_default_and_its_policy_is_checked() -> None:
    worker = Worker(project="acme", deployment="v1")
    worker.add_workflow("default", noop)
    worker.add_workflow("never", noop, retries=0)
    worker.add_workflow("quick", noop, retries=5, backoff=0.25)

    @worker.workflow("custom", backoff=Backoff(first=2, factor=3, cap=10, jitter=0))
    async def custom(ctx: ExecutionContext, payload: Any) -> Any:
        return payload

    policies = worker.retry_policies
    assert policies["default"] == RetryPolicy(retries=DEFAULT_RETRIES) == RetryPolicy(retries=2)
    assert policies["never"].retries == 0
    assert (policies["quick"].retries, policies["quick"].backoff.first) == (5, 0.25)
    waits = [policies["custom"].backoff.delay(n) for n in range(4)]
    assert waits == [2, 6, 10, 10]  # capped
    error = ConnectionError("down")
    assert policies["custom"].retry_in(1, error) == 6
    assert policies["custom"].retry_in(2, error) is None  # its 2 retries are used up
    assert policies["custom"].retry_in(0, NonRetryableError("no")) is None
    jittered = Backoff(first=4, jitter=0.5)
    assert jittered.delay(1, draw=lambda: 0.0) == 8
    assert jittered.delay(1, draw=lambda: 1.0) == 4
    assert Backoff().delay(10_000) <= 300  # no overflow, the cap
    for bad in ({"retries": -1}, {"retries": 101}, {"backoff": -1.0}):
        with pytest.raises(ValueError, match=r"retries|backoff"):
            worker.add_workflow(f"bad{len(bad)}", noop, **bad)
    with pytest.raises(TypeError, match="backoff"):
        worker.add_workflow("bad", noop, backoff="1s")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retries"):
        worker.add_workflow("bad", noop, retries=1.5)  # type: ignore[arg-type]
    assert sorted(worker.workflows) == ["custom", "default", "never", "quick"]


async def test_a_worker_without_workflows_does_not_start() -> None:
    with pytest.raises(RuntimeError, match="no workflow"):
        await Worker(project="acme", deployment="v1").start()


def test_cli_target_must_name_a_worker() -> None:
    with pytest.raises(SystemExit, match="module:attr"):
        load("tests.workflows")
    with pytest.raises(SystemExit, match="no attribute"):
        load("tests.workflows:nothing_here")
    with pytest.raises(SystemExit, match=r"not a worker\.Worker"):
        load("tests.workflows:WORKFLOWS")


def test_names_too_long_for_a_work_queue_are_refused() -> None:
    longest = Worker(project="p" * 64, deployment="d" * 100)
    assert len(longest.work_queue.encode()) <= 255
    with pytest.raises(ValueError, match="invalid deployment id"):
        Worker(project="acme", deployment="d" * 101)
    with pytest.raises(ValueError, match="invalid deployment id"):
        Worker(project="acme", deployment="has space")
    longest.add_workflow("w" * 128, noop)
    with pytest.raises(ValueError, match="at most 128"):
        longest.add_workflow("w" * 129, noop)
