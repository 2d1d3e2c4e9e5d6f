"""Mistakes a fleet can make are reported when it builds its worker, not at run time."""

from __future__ import annotations

from typing import Any

import pytest

from worker import ExecutionContext, Worker
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
