"""Concurrency-key strategies against the real broker, with real (SDK) workers.

G2 per strategy with several dispatchers: under ``partition`` no key ever has
more than the limit running (measured by the workers, and by the owners'
decisions), across a kill -9 of the owner; under ``cancel_in_progress`` no key
ever holds more than one slot and the queue never more than its limit, across
a takeover. A busy key never holds back the others; a newer execution cancels
the older one of its key on its worker.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from schemas.dispatch import TERMINAL_STATUSES, ExecutionStatus, LifecycleEvent
from schemas.topology import results_queue, submit_queue
from tests.conftest import (
    DispatcherFactory,
    GatewayFactory,
    Tenant,
    assert_error,
    detail_fields,
    queue_exists,
)
from tests.dispatcher_support import (
    EventLog,
    Probe,
    QueueKit,
    dispatcher_process,
    probe_worker,
    until,
    wait_for_log,
)
from worker import Worker

S = ExecutionStatus
OWNING = "we own it now"
READY = "dispatcher ready"


@pytest.fixture
async def probe(amqp_url: str, uid: str) -> AsyncIterator[Probe]:
    """Two in-process SDK workers sharing one probe: what the fleet runs at once."""
    probe = Probe()
    fleet: list[Worker] = [probe_worker(amqp_url, uid, probe, concurrency=16) for _ in range(2)]
    for worker in fleet:
        await worker.start()
    yield probe
    for worker in fleet:
        await worker.stop(drain_timeout=0)


def most_holding(events: list[LifecycleEvent]) -> tuple[int, dict[str | None, int]]:
    """The most executions holding a slot at once, in all and per key, by the owners'
    decisions: from an execution's first ``admitted`` to its first end, by each
    event's decision time (``at``). Events are at-least-once and travel in batches
    that may overtake each other; decision times do not. At one instant an end
    counts before an admission: the owner frees a slot before it gives it again."""
    admitted: dict[str, LifecycleEvent] = {}
    ended: dict[str, LifecycleEvent] = {}
    for event in events:
        if event.status is S.ADMITTED:
            seen = admitted
        elif event.status in TERMINAL_STATUSES:
            seen = ended
        else:
            continue
        if event.execution_id not in seen or event.at < seen[event.execution_id].at:
            seen[event.execution_id] = event
    moments: list[tuple[str, int, str | None]] = []
    for execution_id, event in admitted.items():
        if execution_id in ended:  # (an end lost with a killed owner: not counted)
            moments.append((event.at, 1, event.concurrency_key))
            moments.append((ended[execution_id].at, 0, event.concurrency_key))
    total, most = 0, 0
    by_key: dict[str | None, int] = {}
    most_by_key: dict[str | None, int] = {}
    for _, admission, key in sorted(moments, key=lambda m: (m[0], m[1])):
        step = 1 if admission else -1
        total += step
        by_key[key] = by_key.get(key, 0) + step
        most = max(most, total)
        most_by_key[key] = max(most_by_key.get(key, 0), by_key[key])
    return most, most_by_key


async def test_partition_runs_the_limit_per_key_and_holds_it_across_a_kill_9_of_the_owner(
    queue_kit: QueueKit,
    event_log: EventLog,
    probe: Probe,
    processes: list[subprocess.Popen[bytes]],
    amqp_url: str,
    uid: str,
    tmp_path: Path,
) -> None:
    await queue_kit.declare("q", limit=2, strategy="partition")
    owner_log, standby_log = tmp_path / "a.log", tmp_path / "b.log"
    # A short lease: the work of the dead owner's last flush may never have gone
    # out, and is dispatched again only when its lease (from the takeover) ends.
    lease = {"POLOS_DISPATCHER_LEASE_SECONDS": "3"}
    owner = dispatcher_process(amqp_url, uid, owner_log, **lease)
    processes.append(owner)
    await wait_for_log(owner_log, READY)
    processes.append(dispatcher_process(amqp_url, uid, standby_log, **lease))
    await wait_for_log(standby_log, READY)

    keys: list[str | None] = ["a", "b", "c", None]
    ids = [
        await queue_kit.submit("q", {"seconds": 0.4}, key=key, run_timeout=30)
        for key in keys
        for _ in range(6)
    ]
    await event_log.wait_for(
        lambda: sum(1 for e in ids if event_log.terminal(e)) >= 6 and bool(probe.running),
        what="6 completed and more running",
    )
    owner.send_signal(signal.SIGKILL)
    await wait_for_log(standby_log, OWNING, timeout=5)

    ends = await event_log.wait_terminal(ids, timeout=40)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    # Each key (and the keyless partition) reached the limit, never more, and the
    # queue ran more than its limit at once: the limit is per key.
    assert probe.max_running_by_key == {"a": 2, "b": 2, "c": 2, None: 2}
    assert probe.max_running > 2
    _, most_by_key = most_holding(event_log.events)
    assert max(most_by_key.values()) == 2
    # What ran when the owner died kept its slot and ran on: nothing ran twice.
    assert sorted(probe.runs) == sorted(ids)


async def test_partition_a_busy_key_does_not_hold_back_the_others(
    queue_kit: QueueKit, event_log: EventLog, probe: Probe, make_dispatcher: DispatcherFactory
) -> None:
    await queue_kit.declare("q", limit=1, strategy="partition")
    await make_dispatcher()
    hot = [await queue_kit.submit("q", {"seconds": 0.5}, key="hot") for _ in range(5)]
    cold = await queue_kit.submit("q", {"seconds": 0.05}, key="cold")
    keyless = await queue_kit.submit("q", {"seconds": 0.05})

    await event_log.wait_terminal([cold, keyless])
    # Done while the first hot one still ran: they never waited behind hot's lane.
    assert not event_log.terminal(hot[0])
    await event_log.wait_terminal(hot)
    assert [x for x in probe.runs if x in hot] == hot  # FIFO within the key
    assert probe.max_running_by_key["hot"] == 1


async def test_cancel_in_progress_stops_the_running_one_on_its_worker_and_runs_the_newer(
    queue_kit: QueueKit, event_log: EventLog, probe: Probe, make_dispatcher: DispatcherFactory
) -> None:
    await queue_kit.declare("q", limit=1, strategy="cancel_in_progress")
    await make_dispatcher()
    old = await queue_kit.submit("q", {"seconds": 30}, key="deploy-main")
    await event_log.wait_status(old, S.RUNNING)

    new = await queue_kit.submit("q", {"seconds": 0.1}, key="deploy-main")

    cancelled = await event_log.wait_status(old, S.CANCELLED)
    assert cancelled.cancelled_by == new
    assert cancelled.error is not None
    assert new in cancelled.error.message
    completed = await event_log.wait_status(new, S.COMPLETED)
    assert completed.result == {"slept": 0.1}
    await event_log.wait_for(lambda: old in probe.cancelled, what="the old run stopped")
    assert event_log.statuses(old) == [S.ADMITTED, S.RUNNING, S.CANCELLED]


async def test_cancel_in_progress_ends_a_pending_one_unrun_when_a_newer_one_comes(
    queue_kit: QueueKit, event_log: EventLog, probe: Probe, make_dispatcher: DispatcherFactory
) -> None:
    await queue_kit.declare("q", limit=1, strategy="cancel_in_progress")
    await make_dispatcher()
    busy = await queue_kit.submit("q", {"seconds": 1.0}, key="other")
    await event_log.wait_status(busy, S.RUNNING)
    waiting = await queue_kit.submit("q", {"seconds": 0.1}, key="k")
    newer = await queue_kit.submit("q", {"seconds": 0.1}, key="k")

    cancelled = await event_log.wait_status(waiting, S.CANCELLED)
    assert cancelled.cancelled_by == newer
    assert event_log.statuses(waiting) == [S.CANCELLED]
    ends = await event_log.wait_terminal([busy, newer])
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    assert waiting not in probe.runs


async def test_cancel_in_progress_under_load_keeps_one_per_key_and_the_limit_across_a_takeover(
    queue_kit: QueueKit, event_log: EventLog, probe: Probe, make_dispatcher: DispatcherFactory
) -> None:
    await queue_kit.declare("q", limit=3, strategy="cancel_in_progress")
    owner = await make_dispatcher()
    await make_dispatcher()  # the standby
    keys = ["k1", "k2", "k3", "k4", "k5"]
    first = [await queue_kit.submit("q", {"seconds": 0.3}, key=keys[n % 5]) for n in range(30)]
    await event_log.wait_for(
        lambda: sum(1 for e in first if event_log.terminal(e)) >= 10, what="10 ended"
    )
    await owner.stop(drain=False)
    second = [await queue_kit.submit("q", {"seconds": 0.3}, key=keys[n % 5]) for n in range(30)]

    ends = await event_log.wait_terminal(first + second, timeout=40)
    await until(lambda: not probe.running, timeout=10, what="no run left")
    assert {e.status for e in ends.values()} <= {S.COMPLETED, S.CANCELLED}
    newest = [[x for x in second if ends[x].concurrency_key == key][-1] for key in keys]
    assert [ends[x].status for x in newest] == [S.COMPLETED] * len(keys)
    assert set(newest) <= set(probe.finished)  # each ran to its end on a worker
    for event in event_log.events:
        if event.status is S.CANCELLED:
            assert event.cancelled_by is not None
            assert event.cancelled_by > event.execution_id  # by a newer one
        else:
            assert event.status is not S.DEDUPLICATED
    most, most_by_key = most_holding(event_log.events)
    assert most <= 3
    assert max(most_by_key.values()) == 1


async def test_a_strategy_set_in_the_registry_reaches_the_owner_while_executions_run(
    queue_kit: QueueKit, event_log: EventLog, probe: Probe, make_dispatcher: DispatcherFactory
) -> None:
    await queue_kit.declare("q", limit=1)  # deduplicate: one FIFO, one slot
    await make_dispatcher()
    first = await queue_kit.submit("q", {"seconds": 3.0}, key="a")
    await event_log.wait_status(first, S.RUNNING)
    other = await queue_kit.submit("q", {"seconds": 0.05}, key="b")
    same = await queue_kit.submit("q", {"seconds": 0.05}, key="a")

    await queue_kit.set_strategy("q", "partition")

    # b has a partition of its own now; a's is full until the first one ends.
    assert (await event_log.wait_terminal([other]))[other].status is S.COMPLETED
    assert not event_log.terminal(first)
    assert event_log.statuses(same) == []
    ends = await event_log.wait_terminal([first, same])
    assert [ends[first].status, ends[same].status] == [S.COMPLETED, S.COMPLETED]
    assert probe.max_running_by_key == {"a": 1, "b": 1}


async def test_a_submission_over_http_chooses_its_queues_strategy(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    event_log: EventLog,
    probe: Probe,
    make_dispatcher: DispatcherFactory,
    delete_queues: Callable[[str], None],
    amqp: AbstractConnection,
) -> None:
    delete_queues(submit_queue(tenant.project_id, "http"))
    delete_queues(results_queue(tenant.project_id, "http"))
    client = await make_gateway()
    await make_dispatcher()
    url = "/api/v1/workflows/sleep/run"
    common = {"queue_name": "http", "queue_concurrency_limit": 1}

    refused = await client.post(
        url,
        json={"payload": {}, **common, "concurrency_strategy": "newest"},
        headers=tenant.headers,
    )
    error = await assert_error(refused, 400, "VALIDATION_ERROR")
    assert detail_fields(error) == ["concurrency_strategy"]
    assert not await queue_exists(amqp, submit_queue(tenant.project_id, "http"))  # untouched

    ids = []
    for key in ("tenant-a", "tenant-b"):
        response = await client.post(
            url,
            json={
                "payload": {"seconds": 1.0},
                **common,
                "concurrency_strategy": "partition",
                "concurrency_key": key,
            },
            headers=tenant.headers,
        )
        assert response.status == 200, await response.text()
        ids.append((await response.json())["execution_id"])

    ends = await event_log.wait_terminal(ids)
    assert {e.status for e in ends.values()} == {S.COMPLETED}
    # A limit of 1, per key: both ran at once.
    assert probe.max_running_by_key == {"tenant-a": 1, "tenant-b": 1}
    assert probe.max_running == 2
