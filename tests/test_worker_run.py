"""The worker runs what it is handed and reports it: heartbeats while it runs long, then one
terminal result."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aio_pika.abc import AbstractConnection

from broker.deadletter import REASON_HEADER
from schemas.dispatch import Cancelled, Completed, Failed
from schemas.ids import now_rfc3339
from schemas.limits import MAX_RESULT_DEPTH
from schemas.topology import work_queue
from tests.conftest import queue_depth
from tests.worker_harness import FakeDispatcher, StartWorker, take_dead_letters, until
from worker import ExecutionContext, Handler, NonRetryableError, WorkerSettings
from worker._consumer import _names


def until_cancelled() -> tuple[Handler, asyncio.Event]:
    """A workflow that runs until its task is cancelled, and the event it sets then."""
    stopped = asyncio.Event()

    async def forever(ctx: ExecutionContext, payload: Any) -> Any:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set()
            raise

    return forever, stopped


async def test_short_run_reports_only_its_result_which_says_when_it_started(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    worker = await start_worker()
    before = now_rfc3339()

    execution_id = await dispatcher.dispatch("echo", {"greeting": "hi", "n": [1, 2]})

    completed = await dispatcher.wait_for(execution_id, "completed")
    assert isinstance(completed, Completed)
    assert completed.result == {"greeting": "hi", "n": [1, 2]}
    assert completed.worker_id == worker.worker_id
    assert completed.started_at is not None
    assert before <= completed.started_at <= completed.at
    await worker.wait_idle()
    await worker.stop()
    assert [result.type for result in dispatcher.results_of(execution_id)] == ["completed"]
    assert dispatcher.heartbeats_of(execution_id) == []
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_failure_reports_type_message_and_traceback(
    dispatcher: FakeDispatcher, start_worker: StartWorker
) -> None:
    await start_worker()

    execution_id = await dispatcher.dispatch("fail", "bad input")

    failed = await dispatcher.wait_for(execution_id, "failed")
    assert isinstance(failed, Failed)
    assert failed.error.type == "ValueError"
    assert failed.error.message == "cannot handle 'bad input'"
    assert failed.error.traceback is not None
    assert "tests/workflows.py" in failed.error.traceback
    assert "raise ValueError" in failed.error.traceback


async def test_a_failed_run_asks_for_a_retry_while_its_policy_has_one_left(
    dispatcher: FakeDispatcher, start_worker: StartWorker
) -> None:
    seen: list[int] = []

    async def flaky(ctx: ExecutionContext, payload: Any) -> Any:
        seen.append(ctx.retry_count)
        raise ConnectionError("down")

    async def final(ctx: ExecutionContext, payload: Any) -> Any:
        raise NonRetryableError("no")

    await start_worker({"flaky_default": flaky, "final": final})
    first = await dispatcher.dispatch("flaky_default")
    last = await dispatcher.dispatch("flaky_default", retry_count=2)
    declined = await dispatcher.dispatch("final")
    unsendable = await dispatcher.dispatch("unserializable")
    asked: dict[str, float | None] = {}
    for execution_id in (first, last, declined, unsendable):
        failed = await dispatcher.wait_for(execution_id, "failed")
        assert isinstance(failed, Failed)
        asked[execution_id] = failed.retry_in
    # The default policy: 2 retries, the first after 0.5-1 s.
    wait = asked[first]
    assert wait is not None
    assert 0.5 <= wait <= 1.0
    assert asked[last] is None  # its second retry failed: none left
    assert asked[declined] is None
    assert asked[unsendable] is None  # the same code would fail the same way
    assert seen == [0, 2]


async def test_unserializable_result_is_a_failure(
    dispatcher: FakeDispatcher, start_worker: StartWorker
) -> None:
    await start_worker()

    execution_id = await dispatcher.dispatch("unserializable")

    failed = await dispatcher.wait_for(execution_id, "failed")
    assert isinstance(failed, Failed)
    assert failed.error.type == "TypeError"
    assert "not JSON-serializable" in failed.error.message


async def test_a_result_nested_deeper_than_the_owner_reads_is_a_failure(
    dispatcher: FakeDispatcher, start_worker: StartWorker
) -> None:
    await start_worker()

    deepest = await dispatcher.dispatch("nested", payload=MAX_RESULT_DEPTH)
    completed = await dispatcher.wait_for(deepest, "completed")
    assert isinstance(completed, Completed)

    too_deep = await dispatcher.dispatch("nested", payload=MAX_RESULT_DEPTH + 1)
    failed = await dispatcher.wait_for(too_deep, "failed")
    assert isinstance(failed, Failed)
    assert f"nests deeper than {MAX_RESULT_DEPTH} levels" in failed.error.message


async def test_context_carries_the_submission(
    dispatcher: FakeDispatcher, start_worker: StartWorker, uid: str
) -> None:
    worker = await start_worker()
    deadline = time.time() + 30

    execution_id = await dispatcher.dispatch(
        "context",
        deadline=deadline,
        dispatch_id="d-1",
        user_id="u-1",
        initial_state={"step": 2},
        parent_execution_id="p-1",
        root_execution_id="r-1",
        concurrency_key="k-1",
    )

    completed = await dispatcher.wait_for(execution_id, "completed")
    assert isinstance(completed, Completed)
    assert completed.result == {
        "execution_id": execution_id,
        "workflow_id": "context",
        "project_id": uid,
        "deployment_id": "v1",
        "queue_name": "q",
        "dispatch_id": "d-1",
        "deadline": deadline,
        "lease_seconds": 30.0,
        "session_id": f"s-{execution_id}",
        "user_id": "u-1",
        "initial_state": {"step": 2},
        "parent_execution_id": "p-1",
        "root_execution_id": "r-1",
        "concurrency_key": "k-1",
        "worker_id": worker.worker_id,
        "submitted_by": "key_test",
    }


async def test_duplicate_delivery_of_a_running_execution_runs_once(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    calls = 0
    release = asyncio.Event()

    async def gated(ctx: ExecutionContext, payload: Any) -> Any:
        nonlocal calls
        calls += 1
        await release.wait()
        return "once"

    worker = await start_worker({"gated": gated})
    execution_id, body = dispatcher.work("gated")
    await dispatcher.publish(body)
    await dispatcher.wait_for_heartbeat(execution_id)

    await dispatcher.publish(body)
    await dispatcher.publish(body)
    # A later execution behind the duplicates shows they were all handled.
    later = await dispatcher.dispatch("echo", "after")
    await dispatcher.wait_for(later, "completed")
    release.set()

    await dispatcher.wait_for(execution_id, "completed")
    await worker.stop()
    assert calls == 1
    assert [r.type for r in dispatcher.results_of(execution_id)] == ["completed"]
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_past_deadline_delivery_is_dropped(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    worker = await start_worker(concurrency=1)

    late = await dispatcher.dispatch("echo", "too late", deadline=time.time() - 1)
    later = await dispatcher.dispatch("echo", "in time")

    await dispatcher.wait_for(later, "completed")
    await worker.stop()
    assert dispatcher.results_of(late) == []
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_local_deadline_cancels_the_task(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    forever, stopped = until_cancelled()
    worker = await start_worker({"forever": forever})

    execution_id = await dispatcher.dispatch("forever", deadline=time.time() + 0.5)

    cancelled = await dispatcher.wait_for(execution_id, "cancelled", timeout=5)
    assert isinstance(cancelled, Cancelled)
    assert cancelled.reason == "timeout"
    assert stopped.is_set()
    await worker.stop()
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_cancel_message_cancels_the_running_task(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    forever, stopped = until_cancelled()
    worker = await start_worker({"forever": forever})
    execution_id, body = dispatcher.work("forever")
    await dispatcher.publish(body)
    await dispatcher.wait_for_heartbeat(execution_id)

    await dispatcher.cancel(execution_id, "user")

    cancelled = await dispatcher.wait_for(execution_id, "cancelled")
    assert isinstance(cancelled, Cancelled)
    assert cancelled.reason == "user"
    assert stopped.is_set()

    async def released() -> bool:
        # The worker lets go of the execution once its report is confirmed and
        # the work acknowledged, a moment after the report reaches us.
        return worker.running == frozenset()

    await until(released, timeout=5)

    # A later delivery of the cancelled execution is dropped, not run again.
    await dispatcher.publish(body)
    later = await dispatcher.dispatch("echo", "after")
    await dispatcher.wait_for(later, "completed")
    await worker.stop()
    assert [r.type for r in dispatcher.results_of(execution_id)] == ["cancelled"]
    assert await queue_depth(amqp, work_queue(dispatcher.project, "v1")) == 0


async def test_poison_messages_are_dead_lettered_once_with_the_reason(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection, uid: str
) -> None:
    worker = await start_worker()
    garbage = b'{"type": "work", "oops'
    _, foreign = dispatcher.work("echo", project_id=f"{uid}x")

    await dispatcher.publish(garbage, message_id=f"{uid}-garbage")
    await dispatcher.publish(foreign, message_id=f"{uid}-foreign")
    later = await dispatcher.dispatch("echo", "after")
    await dispatcher.wait_for(later, "completed")
    await worker.stop()

    dead = await take_dead_letters(amqp, dispatcher.work_queue)
    by_id = {str(message.message_id): message for message in dead}
    assert sorted(by_id) == [f"{uid}-foreign", f"{uid}-garbage"]
    assert len(dead) == 2
    assert by_id[f"{uid}-garbage"].body == garbage
    reasons = {key: str((m.headers or {})[REASON_HEADER]) for key, m in by_id.items()}
    assert reasons[f"{uid}-garbage"].startswith("undecodable work message")
    assert f"work for {uid}x/v1" in reasons[f"{uid}-foreign"]
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_work_for_a_workflow_not_registered_here_is_reported_failed_not_run(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection, uid: str
) -> None:
    worker = await start_worker()
    first, body = dispatcher.work("added_later")
    last, last_body = dispatcher.work("added_later", retry_count=2)
    await dispatcher.publish(body)
    await dispatcher.publish(last_body)

    failed = await dispatcher.wait_for(first, "failed")
    assert isinstance(failed, Failed)
    assert failed.error.type == "WorkflowNotRegistered"
    assert "'added_later' is not registered" in failed.error.message
    assert failed.started_at is None  # nothing ran
    # The default policy: two retries (perhaps on a worker that has it), then none.
    assert failed.retry_in is not None
    assert failed.retry_in > 0
    final = await dispatcher.wait_for(last, "failed")
    assert isinstance(final, Failed)
    assert final.retry_in is None
    later = await dispatcher.dispatch("echo", "after")
    await dispatcher.wait_for(later, "completed")
    await worker.stop()
    # Acknowledged, not dead-lettered, not requeued.
    assert await take_dead_letters(amqp, dispatcher.work_queue) == []
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_work_whose_results_queue_is_missing_is_dead_lettered_not_lost(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection, uid: str
) -> None:
    worker = await start_worker()
    missing = f"polos.results.{uid}.never-declared"
    _, body = dispatcher.work("echo", "lost?", results_queue=missing)

    await dispatcher.publish(body, message_id=f"{uid}-orphan")
    async with asyncio.timeout(15):
        await worker.wait_idle()
    await worker.stop()

    [dead] = await take_dead_letters(amqp, dispatcher.work_queue)
    assert dead.message_id == f"{uid}-orphan"
    assert dead.body == body
    assert str((dead.headers or {})[REASON_HEADER]) == f"results queue {missing!r} does not exist"
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_finished_dispatch_is_not_rerun_but_a_new_dispatch_is(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    runs: list[str] = []

    async def counted(ctx: ExecutionContext, payload: Any) -> Any:
        runs.append(ctx.dispatch_id)
        return len(runs)

    worker = await start_worker({"counted": counted}, concurrency=1)
    execution_id, first = dispatcher.work("counted", dispatch_id="d-1")
    await dispatcher.publish(first)
    await dispatcher.wait_for(execution_id, "completed")

    # The same dispatch again (a redelivery): its result is already confirmed.
    await dispatcher.publish(first)
    # A new dispatch of the same execution: its owner wants it run.
    _, second = dispatcher.work("counted", execution_id=execution_id, dispatch_id="d-2")
    await dispatcher.publish(second)
    async with asyncio.timeout(10):
        await worker.wait_idle()
    await worker.stop()

    def completed() -> list[tuple[str, Any]]:
        results = dispatcher.results_of(execution_id)
        return [(r.dispatch_id, r.result) for r in results if isinstance(r, Completed)]

    async def both_reported() -> bool:
        return len(completed()) >= 2

    await until(both_reported)
    assert runs == ["d-1", "d-2"]
    assert completed() == [("d-1", 1), ("d-2", 2)]
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


async def test_runs_at_most_concurrency_executions_at_once(
    dispatcher: FakeDispatcher, start_worker: StartWorker
) -> None:
    now = peak = 0
    release = asyncio.Event()

    async def gated(ctx: ExecutionContext, payload: Any) -> Any:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        try:
            await release.wait()
        finally:
            now -= 1

    await start_worker({"gated": gated}, concurrency=2)
    ids = [await dispatcher.dispatch("gated") for _ in range(5)]
    for execution_id in ids[:2]:
        await dispatcher.wait_for_heartbeat(execution_id)
    release.set()
    for execution_id in ids:
        await dispatcher.wait_for(execution_id, "completed")
    assert peak == 2


async def test_a_write_linger_delivers_every_result_once_and_acknowledges_all_work(
    dispatcher: FakeDispatcher, start_worker: StartWorker, amqp: AbstractConnection
) -> None:
    # A linger far longer than the default, so that many executions' results and
    # acknowledgements share each socket write.
    worker = await start_worker(settings=WorkerSettings(worker_write_linger_seconds=0.05))
    ids = [await dispatcher.dispatch("echo", n) for n in range(60)]
    for n, execution_id in enumerate(ids):
        completed = await dispatcher.wait_for(execution_id, "completed")
        assert isinstance(completed, Completed)
        assert completed.result == n
    await worker.wait_idle()
    await worker.stop()
    assert sorted(r.execution_id for r in dispatcher.results if r.type == "completed") == sorted(
        ids
    )
    assert await queue_depth(amqp, dispatcher.work_queue) == 0


def test_the_not_registered_error_lists_a_few_of_the_workers_workflows() -> None:
    async def handler(ctx: ExecutionContext, payload: Any) -> Any:
        return None

    few = {"b": handler, "a": handler}
    assert _names(few) == "a, b"
    many = {f"w{n:02d}": handler for n in range(25)}
    assert _names(many, shown=3) == "w00, w01, w02 and 22 more"
