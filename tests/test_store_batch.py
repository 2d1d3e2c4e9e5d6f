"""A batch written in one script call ends exactly as its events applied one call each.

``ExecutionStore.record`` sends a project's events as one ``APPLY_BATCH_LUA``
call whose arguments travel as JSON (``store.update``). The reference is the
event script itself, ``APPLY_EVENT_LUA`` with ``script_args``, one call per
event, in the same order: every key (hashes, indexes, TTLs) and every message
published on each events channel must be byte for byte the same, in order.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from schemas.dispatch import ErrorInfo, ExecutionStatus, LifecycleEvent, encode
from store import ExecutionStore, StoreError
from store.layout import (
    STATUS_ORDER,
    events_channel,
    index_key,
    record_key,
    status_index_keys,
    trim_bound,
)
from store.update import APPLY_EVENT_LUA, batch_calls, script_args
from tests.store_support import Run

S = ExecutionStatus
RETENTION = 3600


def _histories(project: str, other_project: str) -> list[LifecycleEvent]:
    """Events of every kind the store treats apart, several executions and projects."""
    events: list[LifecycleEvent] = []
    plain = Run(project, payload={"text": 'naïve ☃ "quoted" \\ \u0000 end', "f": 0.1, "n": 2**60})
    events += [plain.event(S.QUEUED, submission=plain.submission()), *plain.lifecycle()]
    failed = Run(project, workflow_id="wf:with:colons")
    error = ErrorInfo(type="ValueError", message="boom", traceback="Traceback\n  line")
    events += [
        failed.admitted(),
        failed.running(),
        failed.event(S.RUNNING, worker_id="w1", error=error, retry_at=failed.at()),
        failed.event(S.RUNNING, worker_id="w2", retry_count=1),
        failed.event(S.FAILED, worker_id="w2", error=error, retry_count=1, started_at=failed.at()),
    ]
    cancelled = Run(project, concurrency_key="k1")
    events += [
        cancelled.admitted(),
        cancelled.event(S.CANCELLED, worker_id="w3", cancelled_by="key_ops"),
    ]
    superseded = Run(project)
    events += [
        superseded.event(S.DEDUPLICATED, duplicate_of="0190b6c5-0000-7000-8000-000000000000"),
        superseded.event(S.ADMITTED, submission=superseded.submission(), attempt=1),
        superseded.event(S.RUNNING, worker_id="w1", attempt=1),
        superseded.event(S.TIMED_OUT, worker_id="w1", attempt=1),
        superseded.event(S.RUNNING, worker_id="w9", attempt=0),  # a late, older attempt
    ]
    elsewhere = Run(other_project)
    events += elsewhere.lifecycle()
    late = Run(project)
    events += [late.completed(result=[1, "two", None]), late.running(), late.admitted()]
    ahead = Run(project)  # a worker whose clock is ahead: started after it was running
    events += [ahead.event(S.RUNNING, worker_id="w1", started_at="2999-01-01T00:00:00.000000Z")]
    return events


async def _snapshot(redis: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` (without it): its contents (a hash's encoding too, and
    in which order a small one lists its fields) and whether it expires."""
    found: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"{prefix}*", count=1000):
        key = raw.decode()
        kind = (await redis.type(raw)).decode()  # type: ignore[union-attr]
        if kind == "hash":
            encoding = await redis.object("encoding", raw)
            fields = list((await redis.hgetall(raw)).items())
            # A small hash (a listpack) lists its fields in the order they were first
            # written; a large one's order is Redis's hash table's (seeded at start-up).
            value: Any = (encoding, fields if encoding == b"listpack" else sorted(fields))
        elif kind == "zset":
            value = await redis.zrange(raw, 0, -1, withscores=True)
        else:
            value = kind
        found[key.removeprefix(prefix)] = (kind, value, await redis.ttl(raw) > 0)
    return found


async def _published(redis: aioredis.Redis, prefix: str, write: Any) -> list[tuple[str, bytes]]:
    """What ``write()`` published on the events channels under ``prefix``, in order."""
    pubsub = redis.pubsub()
    await pubsub.psubscribe(f"{prefix}events:*")
    await pubsub.get_message(timeout=1.0)  # the subscription's confirmation
    try:
        await write()
        got: list[tuple[str, bytes]] = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None:
            if message["type"] == "pmessage":
                got.append((message["channel"].decode().removeprefix(prefix), message["data"]))
        return got
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


def _by_channel(published: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    channels: dict[str, list[bytes]] = {}
    for channel, body in published:
        channels.setdefault(channel, []).append(body)
    return channels


async def _compare(
    redis: aioredis.Redis, uid: str, events: list[LifecycleEvent], *, calls: int = 1
) -> dict[str, Any]:
    """Write ``events`` one reference call each under one prefix, and in ``calls`` batch
    calls of ``ExecutionStore.record`` under another: the same keys, the same messages
    on each channel in the same order. Returns the reference's keys."""
    batched, single = f"test:{uid}:batch:", f"test:{uid}:single:"
    store = ExecutionStore(redis, RETENTION, key_prefix=batched)
    bound = trim_bound(0)

    async def one_call_each() -> None:
        for event in events:
            keys = [
                record_key(single, event.project_id, event.execution_id),
                index_key(single, event.project_id, event.workflow_id),
                *status_index_keys(single, event.project_id, event.workflow_id),
            ]
            channel = events_channel(single, event.project_id, event.execution_id)
            args = script_args(
                event, ttl_seconds=RETENTION, trim_bound=bound, channel=channel, body=encode(event)
            )
            await redis.eval(APPLY_EVENT_LUA, len(keys), *keys, *args)

    async def in_batches() -> None:
        size = -(-len(events) // calls)
        for start in range(0, len(events), size):
            await store.record(events[start : start + size])

    published_single = await _published(redis, single, one_call_each)
    published_batch = await _published(redis, batched, in_batches)
    # In the same order on each channel (a project's calls are apart from another's).
    assert _by_channel(published_batch) == _by_channel(published_single)
    snapshot = await _snapshot(redis, single)
    assert await _snapshot(redis, batched) == snapshot
    return snapshot


async def test_a_batch_call_records_and_publishes_exactly_what_one_call_per_event_does(
    redis: aioredis.Redis, uid: str
) -> None:
    events = _histories(uid, f"{uid}b")
    random.Random(7).shuffle(events)
    events += events[:5]  # redeliveries inside the same batch
    snapshot = await _compare(redis, uid, events)
    records = [value for key, (_, value, _) in snapshot.items() if key.startswith("exec:")]
    assert len(records) == 7
    # Both kinds of hash occur (a listpack's field order is compared as it is).
    assert {encoding for encoding, _ in records} == {b"listpack", b"hashtable"}


def _random_history(rng: random.Random, run: Run) -> list[LifecycleEvent]:
    """Events of one execution as attempts, retries, takeovers and redeliveries mix them."""
    error = ErrorInfo(type="E", message=rng.choice(["x", "y" * 80]), traceback=None)
    events = []
    for _ in range(rng.randint(1, 8)):
        status = rng.choice(list(S))
        fields: dict[str, Any] = {"attempt": rng.choice([0, 0, 1, 2])}
        if rng.random() < 0.4:
            fields["submission"] = run.submission()
        if rng.random() < 0.6:
            fields["worker_id"] = rng.choice(["w1", "w2"])
        if rng.random() < 0.4:
            fields["retry_count"] = rng.randint(0, 2)
        if rng.random() < 0.3:
            # Before the event's own time, or (a clock ahead) after it.
            fields["started_at"] = rng.choice([run.at(), "2999-01-01T00:00:00.000000Z"])
        if status in (S.FAILED, S.RUNNING) and rng.random() < 0.6:
            fields["error"] = error
            if status is S.RUNNING:
                fields["retry_at"] = run.at()
        if status is S.COMPLETED:
            fields["result"] = rng.choice([None, 0, "r", {"big": "z" * 70}])
        if status is S.CANCELLED and rng.random() < 0.5:
            fields["cancelled_by"] = "key_1"
        if status is S.DEDUPLICATED:
            fields["duplicate_of"] = "0190b6c5-0000-7000-8000-000000000000"
        events.append(run.event(status, **fields))
    return events


@pytest.mark.parametrize("seed", range(6))
async def test_random_histories_in_batch_calls_end_as_one_call_per_event(
    redis: aioredis.Redis, uid: str, seed: int
) -> None:
    rng = random.Random(seed)
    payloads = [None, {"p": "q" * 80}, [1, 2.5, "\u2603"]]
    runs = [
        Run(uid, workflow_id=rng.choice(["a", "b:c"]), payload=rng.choice(payloads))
        for _ in range(5)
    ]
    events = [event for run in runs for event in _random_history(rng, run)]
    rng.shuffle(events)
    events += rng.sample(events, k=min(4, len(events)))  # redeliveries
    await _compare(redis, uid, events, calls=rng.randint(1, 3))


async def test_an_event_redis_refuses_fails_the_batch_and_the_rest_is_written_again(
    redis: aioredis.Redis, uid: str
) -> None:
    # Redis refuses an event whose record key holds something else: the batch call
    # stops there (StoreError); what it applied before is kept, and applying it
    # again (the recorder does, one event at a time) is harmless.
    prefix = f"test:{uid}:"
    store = ExecutionStore(redis, RETENTION, key_prefix=prefix)
    before, broken, after = Run(uid), Run(uid), Run(uid)
    await redis.set(record_key(prefix, uid, broken.execution_id), "not a hash")
    batch = [*before.lifecycle(), broken.admitted(), *after.lifecycle()]
    with pytest.raises(StoreError):
        await store.record(batch)
    first = await store.get(uid, before.execution_id)
    assert first is not None
    assert first.status is S.COMPLETED
    # Complete as written: its keys expire (TTLs are renewed once per batch call).
    for key in (record_key(prefix, uid, before.execution_id), index_key(prefix, uid, "summarize")):
        assert 0 < await redis.ttl(key) <= RETENTION
    for event in batch:  # as the recorder does to find the refused one
        try:
            await store.record([event])
        except StoreError:
            assert event.execution_id == broken.execution_id
    for run in (before, after):
        record = await store.get(uid, run.execution_id)
        assert record is not None
        assert record.status is S.COMPLETED


def test_a_batch_is_one_call_per_project_whose_keys_share_its_hash_tag() -> None:
    # Redis Cluster runs a script only if all its keys are in one slot: a call per
    # project, each key named once however many events touch it.
    one, two = Run("p1"), Run("p2", workflow_id="other")
    events = [*one.lifecycle(), *two.lifecycle(), one.completed()]
    calls = batch_calls(
        events, [encode(e) for e in events], prefix="x:", ttl_seconds=60, trim_bound="(0"
    )
    assert len(calls) == 2
    for (keys, args), project, run, count in ((calls[0], "p1", one, 4), (calls[1], "p2", two, 3)):
        assert all(f"{{{project}}}" in key for key in keys)
        assert len(keys) == len(set(keys)) == 1 + len(STATUS_ORDER) + 1
        blob = args[0]
        assert isinstance(blob, bytes)
        items = orjson.loads(blob)
        assert len(items) == count
        for record, first, _status, _at, member, *_ in items:
            assert keys[record - 1] == record_key("x:", project, run.execution_id)
            assert keys[first - 1 :][: 1 + len(STATUS_ORDER)] == [
                index_key("x:", project, run.workflow_id),
                *status_index_keys("x:", project, run.workflow_id),
            ]
            assert member == run.execution_id
        # The channel without the execution id, and the bodies as they are, in order.
        assert args[1:4] == [60, "(0", events_channel("x:", project, "")]
        assert args[4] == b"".join(encode(e) for e in events if e.project_id == project)
