"""The effector's phases, against links whose confirms the test hands out.

What a dead owner's successor may assume (only the work its last record names
may be unsent, ``dispatcher.ledger.fold``) rests on this order: no record goes
out while the previous flush's work is unconfirmed, and nothing a flush settles
is acknowledged when its work is refused. A broker cannot be made to hold a confirm on demand, so
the links here are fakes that log every publish and confirm it when told.
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any, cast

from broker.errors import BrokerError
from dispatcher.consumers import Delivery
from dispatcher.effects import Deliveries, Effector
from dispatcher.lifecycle import QueueLifecycle, Tunables
from dispatcher.work import Links
from schemas.envelope import SubmissionEnvelope
from tests.envelopes import make_submission


class Confirms:
    """Every publish, in order, each waiting until the test confirms (or fails) it."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.waiting: dict[str, asyncio.Future[None]] = {}

    async def publish(self, kind: str, message_id: str) -> None:
        self.log.append(f"{kind} {message_id}")
        future = self.waiting[message_id] = asyncio.get_running_loop().create_future()
        await future

    def confirm(self, message_id: str, exc: BaseException | None = None) -> None:
        future = self.waiting.pop(message_id)
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


class Acks:
    def __init__(self, log: list[str]) -> None:
        self._log = log

    def ack(self, tag: int) -> None:
        self._log.append(f"ack {tag}")


def make_effector(confirms: Confirms) -> tuple[QueueLifecycle, Effector, Deliveries, list[Any]]:
    failures: list[Any] = []
    lifecycle = QueueLifecycle(
        10,
        Tunables(lease_seconds=30, hold_seconds=20, ends_linger_seconds=0),
        owner="o",
        new_id=iter(f"d{n}" for n in itertools.count(1)).__next__,
    )

    async def record(name: str, body: bytes, *, message_id: str) -> None:
        await confirms.publish("record", message_id.rsplit("/", 1)[1])

    async def work(publisher: Any, name: str, body: bytes, *, message_id: str) -> None:
        await confirms.publish("work", message_id)

    def post(*args: Any, **kwargs: Any) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    links = SimpleNamespace(
        publisher=SimpleNamespace(publish=record),
        dispatch=SimpleNamespace(pick=lambda key: None),
        work_queues=SimpleNamespace(publish=work),
        notifier=SimpleNamespace(post=post),
        fail=failures.append,
        ledger_written=lambda project, queue, checkpoint, size: None,
    )
    deliveries = Deliveries()
    effector = Effector(
        cast(Links, links),
        lifecycle,
        deliveries,
        project_id="p",
        queue_name="q",
        results_name="polos.results.p.q",
        after_flush=lambda: None,
    )
    return lifecycle, effector, deliveries, failures


def submit(
    lifecycle: QueueLifecycle, effector: Effector, deliveries: Deliveries, log: list[str], n: int
) -> None:
    raw = make_submission(
        execution_id=f"x{n}", created_at="2026-12-01T00:00:00Z", workflow_id="wf", deployment_id="d"
    )
    envelope = SubmissionEnvelope.model_validate_json(raw)
    ref = deliveries.hold(Delivery(acks=cast(Any, Acks(log)), tag=n, body=raw, redelivered=False))
    lifecycle.on_submission(ref, envelope, raw, 0, 0.0)
    effector.kick()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_no_record_goes_out_while_the_previous_flushs_work_is_unconfirmed() -> None:
    confirms = Confirms()
    lifecycle, effector, deliveries, failures = make_effector(confirms)
    submit(lifecycle, effector, deliveries, confirms.log, 1)
    await settle()
    assert confirms.log == ["record 1"]
    confirms.confirm("1")
    await settle()
    assert confirms.log == ["record 1", "work d1"]

    submit(lifecycle, effector, deliveries, confirms.log, 2)
    submit(lifecycle, effector, deliveries, confirms.log, 3)
    await settle()
    # x1's work is on its way: what was decided meanwhile waits for it, so a dead
    # owner's older records never name work it did not send.
    assert confirms.log == ["record 1", "work d1"]
    confirms.confirm("d1")
    await settle()
    assert confirms.log[2:] == ["record 2"]  # x2 and x3 in one record
    confirms.confirm("2")
    await settle()
    assert sorted(confirms.log[3:]) == ["work d2", "work d3"]
    confirms.confirm("d2")
    confirms.confirm("d3")
    await asyncio.wait_for(effector.wait(), 1)
    assert not failures
    assert not effector.flushing
    assert lifecycle.held == 3


async def test_work_the_broker_refused_ends_the_session_and_nothing_later_goes_out() -> None:
    confirms = Confirms()
    lifecycle, effector, deliveries, failures = make_effector(confirms)
    submit(lifecycle, effector, deliveries, confirms.log, 1)
    await settle()
    confirms.confirm("1")
    await settle()
    submit(lifecycle, effector, deliveries, confirms.log, 2)
    await settle()
    confirms.confirm("d1", BrokerError("channel closed"))
    await asyncio.wait_for(effector.wait(), 1)
    assert [type(f) for f in failures] == [BrokerError]
    assert confirms.log == ["record 1", "work d1"]  # nothing after the refused work
    assert not any(line.startswith("ack") for line in confirms.log)
