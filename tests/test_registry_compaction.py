"""The registry stream stays bounded: snapshots let its retention drop old segments.

The orderings (a snapshot racing an event appended by another process, a
reader whose history was truncated, a reader that saw it all) are table-driven
against ``RegistryLog``; the broker's retention and the followers' snapshots are
tested on a stream of the test's own with a tiny retention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from broker.errors import BrokerUnavailable
from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryFollower, RegistryLog, RegistryState, RegistryWriter
from schemas.registry import (
    DeploymentRegistered,
    QueueDeclared,
    QueueLimitSet,
    QueueStrategySet,
    RegistryEvent,
    RegistrySnapshot,
    ReplayMarker,
    decode_event,
    encode_event,
)
from schemas.topology import registry_stream_arguments
from tests.dispatcher_support import until

AT = "2026-12-03T00:00:00Z"


def deployed(deployment: str, *workflows: str, project: str = "p") -> DeploymentRegistered:
    return DeploymentRegistered(
        at=AT, project_id=project, deployment_id=deployment, workflows=workflows
    )


def declared(queue: str, limit: int | None = None) -> QueueDeclared:
    return QueueDeclared(at=AT, project_id="p", queue_name=queue, concurrency_limit=limit)


def limit(queue: str, value: int) -> QueueLimitSet:
    return QueueLimitSet(at=AT, project_id="p", queue_name=queue, concurrency_limit=value)


def folded(events: list[RegistryEvent]) -> RegistryState:
    state = RegistryState()
    for event in events:
        state.apply(event)
    return state


def same(a: RegistryState, b: RegistryState) -> bool:
    """The same deployments and queue configurations (event ids aside)."""

    def configs(state: RegistryState) -> dict[tuple[str, str], tuple[object, object]]:
        return {k: (c.concurrency_limit, c.concurrency_strategy) for k, c in state.queues.items()}

    return (a.deployments, a.latest, configs(a)) == (b.deployments, b.latest, configs(b))


HISTORY: list[RegistryEvent] = [
    deployed("v1", "a", "b"),
    declared("q1", 3),
    deployed("v2", "a"),
    declared("q2"),
    QueueStrategySet(at=AT, project_id="p", queue_name="q2", concurrency_strategy="partition"),
    deployed("v1", "c"),  # an old fleet restarting adds workflows, never takes "latest" back
    limit("q1", 4),
    deployed("w1", "x", project="other"),
]


def test_a_snapshot_restores_the_state_it_was_taken_of() -> None:
    state = folded(HISTORY)
    snapshot = state.snapshot(through=41)
    decoded = decode_event(encode_event(snapshot))
    assert isinstance(decoded, RegistrySnapshot)
    assert decoded.through == 41
    restored = RegistryState()
    restored.restore(decoded)
    assert same(restored, state)
    assert restored.latest == {"p": "v2", "other": "w1"}
    assert restored.deployments[("p", "v1")].workflows == {"a", "b", "c"}
    # After the snapshot the fold goes on exactly as it would have.
    for state_ in (state, restored):
        state_.apply(deployed("v1", "d"))
        state_.apply(limit("q2", 9))
    assert same(restored, state)


@dataclass
class Case:
    name: str
    # (offset, event); a snapshot is written as ("snapshot", through): of the
    # fold of every event at or below ``through`` in ``stream``
    stream: list[tuple[int, RegistryEvent | tuple[str, int]]]
    start: int = 0  # the first offset the reader reads (the retention dropped those below)
    heard_at_snapshot: list[str] = field(default_factory=list)  # queues listeners hear of


CASES = [
    Case(
        "a reader that saw everything keeps what it had",
        [(i, e) for i, e in enumerate(HISTORY)] + [(8, ("snapshot", 7))],
    ),
    Case(
        # Another gateway set q1's limit while the snapshot was on its way:
        # the snapshot (through 6) must not undo offset 7.
        "an event between the snapshot's through and the snapshot is kept",
        [(i, e) for i, e in enumerate(HISTORY[:7])]
        + [(7, limit("q1", 8)), (8, ("snapshot", 6)), (9, declared("q3"))],
    ),
    Case(
        "a reader whose history was dropped gets it from the snapshot",
        [(i, e) for i, e in enumerate(HISTORY)] + [(8, ("snapshot", 7)), (9, limit("q2", 2))],
        start=6,
        heard_at_snapshot=["q2"],  # q1 it had seen (offset 6), q2 only in the snapshot
    ),
    Case(
        "dropped history and an event racing the snapshot",
        [(i, e) for i, e in enumerate(HISTORY)]
        + [(8, limit("q1", 1)), (9, ("snapshot", 7)), (10, deployed("v3", "z"))],
        start=8,
        heard_at_snapshot=["q2"],
    ),
    Case(
        "offsets with holes (a segment's tracking chunk) change nothing",
        [
            (0, HISTORY[0]),
            (3, HISTORY[1]),
            (4, HISTORY[2]),
            (9, ("snapshot", 4)),
            (11, limit("q1", 2)),
        ],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_reader_ends_with_the_fold_of_the_whole_stream(case: Case) -> None:
    truth: list[RegistryEvent] = []
    events: list[tuple[int, RegistryEvent]] = []
    for offset, item in case.stream:
        if isinstance(item, tuple):
            through = item[1]
            event: RegistryEvent = folded([e for o, e in events if o <= through]).snapshot(through)
        else:
            event = item
            truth.append(item)
        events.append((offset, event))

    log = RegistryLog(RegistryState())
    heard: list[str] = []
    for offset, event in events:
        if offset < case.start:
            continue
        for told in log.read(offset, event, 100):
            if isinstance(event, RegistrySnapshot):
                assert isinstance(told, QueueDeclared)
                heard.append(told.queue_name)
            else:
                assert told is event
    assert same(log.state, folded(truth))
    assert heard == case.heard_at_snapshot
    assert log.first_offset == next(o for o, _ in events if o >= case.start)


def test_what_is_read_again_is_skipped_and_bytes_since_the_snapshot_are_counted() -> None:
    log = RegistryLog(RegistryState())
    assert log.read(0, declared("q1", 1), 50) == [declared("q1", 1)]
    assert log.read(1, ReplayMarker(at=AT, nonce="n"), 30) == [ReplayMarker(at=AT, nonce="n")]
    assert log.since_snapshot == 80
    log.state.apply(limit("q1", 7))  # (so a replay that applied it again would show)
    assert log.read(0, declared("q1", 1), 50) == []  # after a reconnect
    assert log.state.queues[("p", "q1")].concurrency_limit == 7
    log.read(2, RegistryState().snapshot(1), 500)
    assert log.since_snapshot == 0


# -- against the broker ---------------------------------------------------------


async def _replay(url: str, stream: str, arguments: dict[str, object]) -> RegistryFollower:
    connection = await aio_pika.connect(url)
    publisher = ConfirmedPublisher(connection, confirm_timeout=5, channels=1)
    await publisher.start()
    follower = RegistryFollower(
        connection,
        RegistryWriter(publisher, stream=stream),
        RegistryState(),
        arguments=dict(arguments),
        snapshot_every_bytes=10**9,
    )
    await follower.start()
    async with asyncio.timeout(20):
        await follower.replayed.wait()
    await follower.close()
    await connection.close()
    return follower


async def test_the_stream_drops_old_segments_and_a_new_reader_still_knows_everything(
    amqp_url: str, uid: str, delete_queues: Callable[[str], None]
) -> None:
    stream = f"polos.registry.test-{uid}"
    delete_queues(stream)
    # ~20 events a segment, ~5 segments kept; a snapshot every ~30 events.
    arguments = registry_stream_arguments(max_bytes=24_000, segment_bytes=4_000)
    connection = await aio_pika.connect(amqp_url)
    try:
        publisher = ConfirmedPublisher(connection, confirm_timeout=5, channels=1)
        await publisher.start()
        writer = RegistryWriter(publisher, stream=stream)
        live = RegistryFollower(
            connection,
            writer,
            RegistryState(),
            arguments=arguments,
            snapshot_every_bytes=5_000,
            snapshot_jitter=0.0,
        )
        await live.start()
        await live.replayed.wait()
        truth: list[RegistryEvent] = [deployed("v1", "hello"), declared("first", 2)]
        for event in truth:
            await writer.append(event)
        for i in range(400):
            event = limit(f"q{i % 25}", i) if i % 3 else declared(f"q{i % 25}", i)
            truth.append(event)
            await writer.append(event)
            await asyncio.sleep(0)  # let the follower read (and snapshot) as it goes
        expected = folded(truth)
        await until(
            lambda: same(live.state, expected) and live.log.since_snapshot < 5_000,
            timeout=10,
            what="the live follower read everything, its last snapshot written",
        )
        await live.close()
    finally:
        await connection.close()

    fresh = await _replay(amqp_url, stream, arguments)
    assert same(fresh.state, expected)
    # The events of "first" and "v1" were dropped with the oldest segments: the
    # fresh reader knows them from a snapshot.
    assert (fresh.log.first_offset or 0) > 2
    assert fresh.state.queues[("p", "first")].concurrency_limit == 2
    assert fresh.state.resolve("p", None) is not None
    # And it still knows each queue's latest event ids (a submission naming one is
    # admitted at once).
    for key, config in live.state.queues.items():
        assert fresh.state.queues[key].latest_event_id == config.latest_event_id


class _FlakyWriter(RegistryWriter):
    """Refuses the first append (the broker down), takes the rest."""

    def __init__(self) -> None:
        self.stream = "unused"
        self.appended: list[RegistryEvent] = []
        self.refusals = 1

    async def append(self, event: RegistryEvent, *, event_id: str | None = None) -> str:
        if self.refusals:
            self.refusals -= 1
            raise BrokerUnavailable("no connection")
        self.appended.append(event)
        return event_id or str(len(self.appended))


async def test_a_snapshot_the_broker_refuses_is_tried_again_at_the_next_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = _FlakyWriter()
    state = folded(HISTORY)
    follower = RegistryFollower(
        cast("AbstractConnection", None), writer, state, snapshot_every_bytes=1, snapshot_jitter=0
    )
    follower.replayed.set()
    for attempt in range(2):
        follower.log.read(10 + attempt, limit("q9", attempt), 10)
        follower._maybe_snapshot()
        await until(lambda: follower._snapshotting is None, what="the snapshot attempt")
    assert "cannot append a registry snapshot" in caplog.text
    (snapshot,) = writer.appended
    assert isinstance(snapshot, RegistrySnapshot)
    assert snapshot.through == 11
    restored = RegistryState()
    restored.restore(snapshot)
    assert same(restored, state)


async def test_no_snapshot_from_a_reader_that_skipped_a_newer_type_until_one_covers_it() -> None:
    follower = RegistryFollower(
        cast("AbstractConnection", None),
        _FlakyWriter(),
        RegistryState(),
        snapshot_every_bytes=1,
        snapshot_jitter=0,
    )
    follower.replayed.set()
    log = follower.log
    # Invalid events of a known type are skipped by every release: not blind.
    log.unreadable(0, b'{"type": "deployment_registered", "project_id": "bad id!"}')
    log.unreadable(1, b"not json")
    assert not log.blind
    assert log.since_snapshot > 0
    log.unreadable(2, b'{"type": "queue_retired", "at": "t", "queue_name": "q"}')
    assert log.blind
    follower._maybe_snapshot()
    assert follower._snapshotting is None  # its snapshot would drop queue_retired
    log.read(3, RegistryState().snapshot(2), 10)  # a newer reader's, covering it
    assert not log.blind
    log.unreadable(3, b'{"type": "queue_retired"}')  # read again: already counted
    assert not log.blind
    log.read(4, declared("q"), 10)
    follower._maybe_snapshot()
    assert follower._snapshotting is not None
    follower._snapshotting.cancel()
