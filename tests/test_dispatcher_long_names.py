"""Names as long as the contract allows: every event is still published and every
submission acknowledged (an event routing key never outgrows AMQP's 255 bytes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import ValidationError

from schemas.dispatch import ExecutionStatus
from schemas.registry import DeploymentRegistered
from schemas.topology import event_routing_key, results_queue, submit_queue
from tests.conftest import DispatcherFactory, queue_depth
from tests.dispatcher_support import DEPLOYMENT, EventLog, QueueKit, in_flight_per_ledger
from worker import ExecutionContext, Worker

S = ExecutionStatus

LONG_QUEUE = "emails.eu:" + "q" * 118  # 128 characters, the most a queue name may have
LONG_WORKFLOW = "summarize." + "w" * 118  # 128 characters, the most a worker may register


def test_event_routing_key_fits_for_the_longest_names_and_is_stable() -> None:
    project = "p" * 64
    queue = "é" * 128  # 256 bytes on its own
    workflow = "x" * 5000  # not bounded by the submission path
    execution_id = "01890a5d-ac96-774b-bcce-b302099a8057"

    key = event_routing_key(project, queue, workflow, execution_id)

    assert len(key.encode()) <= 255
    assert key == event_routing_key(project, queue, workflow, execution_id)
    words = key.split(".")
    assert len(words) == 4
    assert words[0] == project  # every valid project id stays whole: `<project>.#` binds
    assert words[-1] == execution_id
    assert len(event_routing_key("é" * 64, queue, workflow, "é" * 400).encode()) <= 255
    assert words[1] != event_routing_key(project, queue + "é", workflow, execution_id).split(".")[1]
    # Short names are left as they were: existing bindings keep working.
    assert event_routing_key("acme", "emails.eu", "summarize", execution_id) == (
        f"acme.emails_eu.summarize.{execution_id}"
    )


@pytest.fixture
async def worker(amqp_url: str, uid: str) -> AsyncIterator[Worker]:
    async def echo(ctx: ExecutionContext, payload: Any) -> Any:
        return {"queue": ctx.queue_name, "payload": payload}

    worker = Worker(project=uid, deployment=DEPLOYMENT, concurrency=8, amqp_url=amqp_url)
    worker.add_workflow(LONG_WORKFLOW, echo)
    await worker.start()
    yield worker
    await worker.stop(drain_timeout=0)


async def test_executions_of_the_longest_queue_and_workflow_names_complete_and_are_acknowledged(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    worker: Worker,
    amqp: AbstractConnection,
) -> None:
    await queue_kit.declare(LONG_QUEUE, limit=1)  # a window of 32 deliveries
    dispatcher = await make_dispatcher()

    # More than one window: unacknowledged submissions would stall the queue.
    ids = [await queue_kit.submit(LONG_QUEUE, n, workflow=LONG_WORKFLOW) for n in range(40)]
    ends = await event_log.wait_terminal(ids, timeout=30)

    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert ends[ids[7]].result == {"queue": LONG_QUEUE, "payload": 7}
    for execution_id in ids:
        assert [s for s in event_log.statuses(execution_id) if s is not S.RUNNING] == [
            S.ADMITTED,
            S.COMPLETED,
        ]
    first = event_log.first(ids[0], S.ADMITTED)
    assert (first.queue_name, first.workflow_id) == (LONG_QUEUE, LONG_WORKFLOW)
    await dispatcher.stop()  # whatever it did not acknowledge is back in the queues now
    assert await queue_depth(amqp, submit_queue(queue_kit.project, LONG_QUEUE)) == 0
    assert await in_flight_per_ledger(amqp, results_queue(queue_kit.project, LONG_QUEUE)) == set()


def test_registering_names_too_long_for_a_work_queue_is_refused_with_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.cli import main

    with pytest.raises(ValidationError):
        DeploymentRegistered(at="x", project_id="acme", deployment_id="d" * 101, workflows=("a",))
    with pytest.raises(ValidationError):
        DeploymentRegistered(at="x", project_id="acme", deployment_id="v1", workflows=("w" * 129,))

    argv = ["deployments", "register", "--project", "acme", "--deployment", "d" * 101]
    assert main([*argv, "--workflow", "a"]) == 2
    assert "deployment id" in capsys.readouterr().err
    argv = ["deployments", "register", "--project", "acme", "--deployment", "v1"]
    assert main([*argv, "--workflow", "w" * 129]) == 2
    assert "workflow id of 129 characters" in capsys.readouterr().err
