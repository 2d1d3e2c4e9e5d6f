"""A worker's results share messages: what is decided together goes out together.

The pure part (``ResultBatches`` against a reporter whose confirms the test
holds by hand) pins the group commit: one message per round and queue, the
next one gathering while it waits for its confirm, failures shared alike. The
broker part runs a real worker: many results, fewer messages, every one right.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from broker.errors import BrokerUnavailable
from schemas.dispatch import Completed, Results, decode_reports, decode_result, encode
from schemas.limits import MAX_RESULT_DEPTH
from tests.conftest import queue_depth
from tests.worker_harness import FakeDispatcher, StartWorker
from worker import ExecutionContext
from worker._reporting import MAX_BATCH_REPORTS, MAX_BATCHED_BRACKETS, Reporter, ResultBatches


def report(n: int, result: Any = None) -> bytes:
    return encode(
        Completed(execution_id=f"e{n}", dispatch_id=f"d{n}", worker_id="w", at="t", result=result)
    )


class HeldReporter(Reporter):
    """Every publish waits until the test lets it land (or fail)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []
        self._landings: list[asyncio.Future[None]] = []

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        landing = asyncio.get_running_loop().create_future()
        self.sent.append((queue, body, message_id))
        self._landings.append(landing)
        await landing

    def land(self, index: int, error: Exception | None = None) -> None:
        if error is None:
            self._landings[index].set_result(None)
        else:
            self._landings[index].set_exception(error)

    def ids(self, index: int) -> list[str]:
        return [r.execution_id for r in decode_reports(self.sent[index][1])]  # type: ignore[union-attr]


async def rounds(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_the_reports_of_one_round_go_out_as_one_message_per_queue() -> None:
    reporter = HeldReporter()
    batches = ResultBatches(reporter, batch_id="w")
    callers = [
        asyncio.create_task(batches.publish("qa", report(n), message_id=f"m{n}")) for n in range(3)
    ]
    other = asyncio.create_task(batches.publish("qb", report(9), message_id="m9"))
    await rounds()
    assert [queue for queue, _, _ in reporter.sent] == ["qa", "qb"]
    assert reporter.ids(0) == ["e0", "e1", "e2"]
    assert isinstance(decode_result(reporter.sent[0][1]), Results)
    # A lone report goes as itself, with its own message id (old owners read it).
    assert reporter.sent[1][1] == report(9)
    assert reporter.sent[1][2] == "m9"
    assert not any(c.done() for c in [*callers, other])
    reporter.land(0)
    await rounds()
    assert all(c.done() for c in callers)
    assert not other.done()
    reporter.land(1)
    await asyncio.gather(*callers, other)


async def test_while_a_message_waits_for_its_confirm_the_next_reports_gather() -> None:
    reporter = HeldReporter()
    batches = ResultBatches(reporter, batch_id="w")
    first = asyncio.create_task(batches.publish("q", report(0), message_id="m0"))
    await rounds()
    later = []
    for n in range(1, 6):
        later.append(asyncio.create_task(batches.publish("q", report(n), message_id=f"m{n}")))
        await rounds()  # each in a round of its own: still one message, sent on the confirm
    assert len(reporter.sent) == 1
    reporter.land(0)
    await first
    await rounds()
    assert len(reporter.sent) == 2
    assert reporter.ids(1) == ["e1", "e2", "e3", "e4", "e5"]
    assert not any(c.done() for c in later)
    reporter.land(1)
    await asyncio.gather(*later)


async def test_a_failed_message_fails_every_report_it_carried_and_the_next_goes_on() -> None:
    reporter = HeldReporter()
    batches = ResultBatches(reporter, batch_id="w")
    doomed = [
        asyncio.create_task(batches.publish("q", report(n), message_id=f"m{n}")) for n in range(2)
    ]
    await rounds()
    waiting = asyncio.create_task(batches.publish("q", report(2), message_id="m2"))
    await rounds()
    reporter.land(0, BrokerUnavailable("gone"))
    for caller in doomed:
        with pytest.raises(BrokerUnavailable):
            await caller
    await rounds()
    assert reporter.ids(1) == ["e2"]
    reporter.land(1)
    await waiting


async def test_a_caller_cancelled_while_it_waits_leaves_the_message_to_the_others() -> None:
    reporter = HeldReporter()
    batches = ResultBatches(reporter, batch_id="w")
    leaving = asyncio.create_task(batches.publish("q", report(0), message_id="m0"))
    staying = asyncio.create_task(batches.publish("q", report(1), message_id="m1"))
    await rounds()
    leaving.cancel()
    await rounds()
    assert not staying.done()
    reporter.land(0)
    await staying
    assert leaving.cancelled()
    assert reporter.ids(0) == ["e0", "e1"]


async def test_a_report_too_deep_for_a_batch_and_a_full_batch_go_at_once() -> None:
    reporter = HeldReporter()
    batches = ResultBatches(reporter, batch_id="w")
    deep_body = report(
        0, result=orjson.loads(b"[" * MAX_BATCHED_BRACKETS + b"]" * MAX_BATCHED_BRACKETS)
    )
    deep = asyncio.create_task(batches.publish("q", deep_body, message_id="deep"))
    full = [
        asyncio.create_task(batches.publish("q", report(n), message_id=f"m{n}"))
        for n in range(1, MAX_BATCH_REPORTS + 2)
    ]
    await rounds()
    # The deep one went alone, and the batch that filled went before its round came.
    assert reporter.sent[0] == ("q", deep_body, "deep")
    assert len(reporter.ids(1)) == MAX_BATCH_REPORTS
    assert len(reporter.sent) == 2  # the one over waits for the full one's confirm
    reporter.land(1)
    await rounds()
    assert reporter.ids(2) == [f"e{MAX_BATCH_REPORTS + 1}"]
    reporter.land(0)
    reporter.land(2)
    await asyncio.gather(deep, *full)


async def test_closing_fails_what_is_open_and_on_its_way() -> None:
    reporter = HeldReporter()
    batches = ResultBatches(reporter, batch_id="w")
    flying = asyncio.create_task(batches.publish("q", report(0), message_id="m0"))
    await rounds()
    gathering = asyncio.create_task(batches.publish("q", report(1), message_id="m1"))
    await rounds()
    await batches.close()
    for caller in (flying, gathering):
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert len(reporter.sent) == 1


# -- with a broker ------------------------------------------------------------------------


async def test_results_decided_together_share_messages_and_each_arrives_right(
    dispatcher: FakeDispatcher, start_worker: StartWorker
) -> None:
    release = asyncio.Event()

    async def gate(ctx: ExecutionContext, payload: Any) -> Any:
        await release.wait()
        return {"n": payload}

    await start_worker({"gate": gate}, concurrency=64)
    count = 40
    ids = await asyncio.gather(*(dispatcher.dispatch("gate", n) for n in range(count)))
    # The deepest result a handler may return is sent alone, and arrives.
    deep = await dispatcher.dispatch("nested", payload=MAX_RESULT_DEPTH)
    for execution_id in ids:  # every one started and waiting (reported running)
        await dispatcher.wait_for_heartbeat(execution_id)
    release.set()
    for n, execution_id in enumerate(ids):
        completed = await dispatcher.wait_for(execution_id, "completed")
        assert isinstance(completed, Completed)
        assert completed.result == {"n": n}
    assert (await dispatcher.wait_for(deep, "completed")).type == "completed"
    reports = [r for r in dispatcher.results if isinstance(r, Completed)]
    assert len(reports) == count + 1
    # 40 results decided in one round: a few messages, not one each (the heartbeats
    # that reported them running, more or fewer as they started, are not counted).
    assert dispatcher.result_messages <= count // 4
    assert await queue_depth(dispatcher.connection, dispatcher.work_queue) == 0
