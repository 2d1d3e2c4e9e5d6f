"""A submission carrying a new limit or strategy is decided under it, not under the old one.

The gateway records the change on the registry stream and then publishes the
submission, naming the event (``queue_config_id``); the two travel apart, so the
dispatcher may read the submission first. It then holds it (and what follows
it) until the registry delivers that event, or for a bounded time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from broker.registry import CONFIG_IDS_IN_SNAPSHOT, CONFIG_IDS_KEPT, RegistryState
from dispatcher.config_wait import ConfigWait
from dispatcher.settings import Settings as DispatcherSettings
from schemas.dispatch import ExecutionStatus
from schemas.envelope import decode_submission, with_queue_config
from schemas.registry import QueueDeclared, QueueLimitSet
from tests.conftest import DispatcherFactory, ProbeFactory
from tests.dispatcher_support import EventLog, QueueKit
from tests.envelopes import make_submission

S = ExecutionStatus

# -- the waiting room, table-driven ----------------------------------------------------


@dataclass(frozen=True)
class Step:
    """At ``at``: offer ``item`` naming ``config`` (or, with ``item`` None, hear
    ``config`` and release); ``admitted``: what comes out, in order."""

    at: float
    item: str | None
    config: str | None
    admitted: tuple[str, ...]


CASES: dict[str, list[Step]] = {
    "no id: admitted at once": [Step(0, "a", None, ("a",))],
    "an id already heard: admitted at once": [Step(0, "a", "old", ("a",))],
    "an id not heard yet waits for it": [
        Step(0, "a", "e1", ()),
        Step(0.1, None, "e1", ("a",)),
    ],
    "what follows a waiting one waits behind it, then leaves in order": [
        Step(0, "a", "e1", ()),
        Step(0.1, "b", None, ()),
        Step(0.2, "c", "old", ()),
        Step(0.3, None, "e1", ("a", "b", "c")),
    ],
    "hearing another event releases nothing": [
        Step(0, "a", "e1", ()),
        Step(0.1, None, "e2", ()),
        Step(0.2, None, "e1", ("a",)),
    ],
    "a second wait behind the first: each leaves when its own event is heard": [
        Step(0, "a", "e1", ()),
        Step(0.1, "b", "e2", ()),
        Step(0.2, "c", None, ()),
        Step(0.3, None, "e1", ("a",)),
        Step(0.4, None, "e2", ("b", "c")),
    ],
    "heard in the other order: both leave with the first": [
        Step(0, "a", "e1", ()),
        Step(0.1, "b", "e2", ()),
        Step(0.2, None, "e2", ()),
        Step(0.3, None, "e1", ("a", "b")),
    ],
    "never heard: admitted at its bound, counted": [
        Step(0, "a", "lost", ()),
        Step(0.5, "b", None, ()),
        Step(0.99, None, None, ()),
        Step(1.0, None, None, ("a", "b")),
    ],
    "the bound counts from each one's arrival": [
        Step(0, "a", "lost", ()),
        Step(0.5, "b", "lost", ()),
        Step(1.0, None, None, ("a",)),
        Step(1.4, None, None, ()),
        Step(1.5, None, None, ("b",)),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_waiting_for_the_registry(steps: list[Step]) -> None:
    heard = {"old"}
    wait: ConfigWait[str] = ConfigWait(bound=1.0)
    for step in steps:
        if step.item is not None:
            out = wait.offer(step.item, step.config, heard.__contains__, step.at)
        else:
            if step.config is not None:
                heard.add(step.config)
            out = wait.release(heard.__contains__, step.at)
        assert tuple(out) == step.admitted, step
    assert len(wait) == 0
    assert wait.deadline() is None
    lost = sum(1 for s in steps if s.config == "lost" and s.item is not None)
    assert wait.timed_out == lost


def test_the_deadline_is_the_first_waiting_ones() -> None:
    wait: ConfigWait[str] = ConfigWait(bound=2.0)
    assert wait.offer("a", "e1", lambda _: False, 10.0) == []
    assert wait.offer("b", "e2", lambda _: False, 11.0) == []
    assert wait.deadline() == 12.0
    assert wait.release(lambda i: i == "e1", 11.5) == ["a"]
    assert wait.deadline() == 13.0
    wait.clear()
    assert wait.deadline() is None


def test_a_reader_remembers_a_queues_latest_event_ids_and_a_snapshot_the_last_few() -> None:
    state = RegistryState()
    state.apply(QueueDeclared(at="t", project_id="p", queue_name="q"), "first")
    for n in range(CONFIG_IDS_KEPT):
        state.apply(
            QueueLimitSet(at="t", project_id="p", queue_name="q", concurrency_limit=n), f"e{n}"
        )
    assert state.has_heard("p", "q", f"e{CONFIG_IDS_KEPT - 1}")
    assert not state.has_heard("p", "q", "first")  # pushed out by newer ones
    assert not state.has_heard("p", "other", "e1")
    # Read again (a reconnect, the gateway's own append echoed): it is the newest again.
    state.apply(QueueLimitSet(at="t", project_id="p", queue_name="q", concurrency_limit=1), "e0")
    assert state.queues[("p", "q")].latest_event_id == "e0"
    restored = RegistryState()
    restored.restore(state.snapshot(through=99))
    kept = state.queues[("p", "q")].event_ids[-CONFIG_IDS_IN_SNAPSHOT:]
    assert restored.queues[("p", "q")].event_ids == kept
    assert restored.has_heard("p", "q", "e0")


def test_the_envelope_names_the_event_and_decodes_as_before_otherwise() -> None:
    body = make_submission(execution_id="x", created_at="t", queue_concurrency_limit=3)
    assert decode_submission(body).queue_config_id is None
    named = decode_submission(with_queue_config(body, 'a"b\\c'))
    assert named.queue_config_id == 'a"b\\c'
    assert named.model_dump(exclude={"queue_config_id"}) == decode_submission(body).model_dump(
        exclude={"queue_config_id"}
    )


def test_the_wait_must_end_before_the_hold_bound() -> None:
    with pytest.raises(ValidationError, match="CONFIG_WAIT_SECONDS must be less than"):
        DispatcherSettings(dispatcher_config_wait_seconds=20, dispatcher_hold_seconds=20)
    # Only the hold set, shorter than the default wait: the wait shrinks with it.
    assert DispatcherSettings(dispatcher_hold_seconds=4).config_wait_seconds == 2


# -- on the broker ---------------------------------------------------------------------


async def test_a_submission_read_before_its_new_limit_waits_for_it_and_runs_under_it(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
) -> None:
    await queue_kit.declare("q", limit=4)
    probe = await start_probe(concurrency=20)
    dispatcher = await make_dispatcher(dispatcher_config_wait_seconds=15)
    await asyncio.sleep(0.3)  # the dispatcher owns the queue
    # The gateway's order, as the dispatcher may read it: the submissions lowering
    # the limit to 1 first, the registry event that records it after them.
    event_id = uuid.uuid4().hex
    ids = [
        await queue_kit.submit("q", {"seconds": 0.3}, limit=1, config_id=event_id) for _ in range(4)
    ]
    await asyncio.sleep(0.5)
    assert probe.runs == []  # under the old limit, all four would be running now
    assert not dispatcher.idle.is_set()  # waiting is work: a burst dispatcher stays

    await queue_kit.set_limit("q", 1, event_id=event_id)

    ends = await event_log.wait_terminal(ids)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert probe.max_running == 1
    assert probe.runs == ids  # in order


async def test_a_submission_whose_event_never_comes_is_admitted_at_the_bound(
    queue_kit: QueueKit,
    event_log: EventLog,
    make_dispatcher: DispatcherFactory,
    start_probe: ProbeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await queue_kit.declare("q", limit=2)
    probe = await start_probe()
    dispatcher = await make_dispatcher(dispatcher_config_wait_seconds=1.0)
    await asyncio.sleep(0.3)
    began = time.monotonic()
    # The event it names never reaches this dispatcher (its registry reader is far
    # behind, or the id was pushed out of the few it keeps per queue).
    lost = await queue_kit.submit("q", {"seconds": 0.05}, limit=3, config_id=uuid.uuid4().hex)
    plain = await queue_kit.submit("q", {"seconds": 0.05})

    ends = await event_log.wait_terminal([lost, plain])
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    # Neither before the bound (the plain one waited behind), admitted in order;
    # admitted together, they race to the worker.
    assert event_log.arrival(plain, S.ADMITTED) - began >= 0.9
    admitted = [e.execution_id for e in event_log.events if e.status is S.ADMITTED]
    assert admitted == [lost, plain]
    assert sorted(probe.runs) == sorted([lost, plain])
    assert "admitted without the registry event they name" in caplog.text
    timeouts = dispatcher.observer.registry.get_sample_value(
        "polos_queue_config_wait_timeouts_total",
        {"project": queue_kit.project, "queue": "q"},
    )
    assert timeouts == 1  # the plain one behind it named nothing: not counted
