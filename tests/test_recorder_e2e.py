"""The recorder turns lifecycle events published on ``polos.events`` (in batches, or one
to a message as before batches) into records, and publishes each on its Redis channel."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from broker.deadletter import REASON_HEADER
from broker.topology import declare_recorder_queue
from schemas.dispatch import ExecutionStatus, encode, encode_event_batch
from schemas.topology import event_batch_routing_key
from store import ExecutionStore
from store.layout import events_channel
from tests.conftest import queue_depth
from tests.store_support import (
    RecorderFactory,
    Run,
    eventually,
    publish_events,
    publish_raw,
    recorder_settings,
    single_event_key,
)
from tests.worker_harness import take_dead_letters

ROOT = Path(__file__).resolve().parent.parent


async def all_in(store: ExecutionStore, runs: list[Run], status: ExecutionStatus) -> bool:
    for run in runs:
        record = await store.get(run.project_id, run.execution_id)
        if record is None or record.status != status:
            return False
    return True


async def test_published_events_become_records(
    make_recorder: RecorderFactory, amqp: AbstractConnection, store: ExecutionStore, uid: str
) -> None:
    recorder = await make_recorder()
    runs = [Run(uid, payload={"i": i}) for i in range(40)]

    await publish_events(amqp, [event for run in runs for event in run.lifecycle()])

    await eventually(lambda: all_in(store, runs, ExecutionStatus.COMPLETED), what="records")
    record = await store.get(uid, runs[7].execution_id)
    assert record is not None
    assert record.payload == {"i": 7}
    assert record.result == {"done": runs[7].execution_id}
    assert record.started_at is not None
    await eventually(lambda: recorder.pending == 0, what="acks")
    assert recorder.stats.acked == 12  # ten events to a message
    assert recorder.stats.recorded == 120
    assert await queue_depth(amqp, recorder.settings.recorder_queue) == 0


async def test_events_published_out_of_order_end_terminal(
    make_recorder: RecorderFactory, amqp: AbstractConnection, store: ExecutionStore, uid: str
) -> None:
    await make_recorder()
    runs = [Run(uid) for _ in range(10)]

    # Terminal first, then what happened before it, in separate publishes.
    await publish_events(amqp, [run.lifecycle()[2] for run in runs])
    await eventually(lambda: all_in(store, runs, ExecutionStatus.COMPLETED), what="completed")
    await publish_events(amqp, [e for run in runs for e in reversed(run.lifecycle()[:2])])

    async def submissions_merged() -> bool:
        for run in runs:
            record = await store.get(uid, run.execution_id)
            if record is None or record.payload != run.payload or record.admitted_at is None:
                return False
        return True

    await eventually(submissions_merged, what="late submissions merged")
    assert await all_in(store, runs, ExecutionStatus.COMPLETED)


async def test_a_bad_event_in_a_batch_is_dead_lettered_alone_and_the_rest_recorded(
    make_recorder: RecorderFactory, amqp: AbstractConnection, store: ExecutionStore, uid: str
) -> None:
    recorder = await make_recorder()
    good, other = Run(uid), Run(uid)
    bad = b'{"type":"lifecycle","status":"exploded","execution_id":"x"}'
    batch = encode_event_batch([encode(e) for e in good.lifecycle()[:2]] + [bad])
    await publish_raw(
        amqp,
        [
            (event_batch_routing_key(uid), b"not json at all"),
            (event_batch_routing_key(uid), batch),
            (event_batch_routing_key(uid), b'{"type": "events", "events": "none"}'),
        ],
    )
    await publish_events(amqp, [good.lifecycle()[2], *other.lifecycle()])

    await eventually(
        lambda: all_in(store, [good, other], ExecutionStatus.COMPLETED), what="records"
    )
    record = await store.get(uid, good.execution_id)
    assert record is not None
    assert record.payload == good.payload  # from the batch's admitted event
    await eventually(lambda: recorder.pending == 0, what="everything settled")
    dead: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(10):
        while len(dead) < 3:
            dead += await take_dead_letters(amqp, recorder.settings.recorder_queue)
    bodies = sorted(m.body for m in dead)
    assert bodies == sorted([b"not json at all", b'{"type": "events", "events": "none"}', bad])
    reasons = {m.body: str((m.headers or {})[REASON_HEADER]) for m in dead}
    assert "in a batch" in reasons[bad]
    assert "undecodable" in reasons[b"not json at all"]
    assert recorder.stats.recorded == 6
    assert await queue_depth(amqp, recorder.settings.recorder_queue) == 0


async def test_single_events_published_before_batches_are_still_recorded(
    make_recorder: RecorderFactory, amqp: AbstractConnection, store: ExecutionStore, uid: str
) -> None:
    await make_recorder()
    runs = [Run(uid) for _ in range(3)]
    await publish_raw(
        amqp, [(single_event_key(e), encode(e)) for run in runs for e in run.lifecycle()]
    )
    await eventually(lambda: all_in(store, runs, ExecutionStatus.COMPLETED), what="records")


async def test_each_recorded_event_is_published_on_its_execution_channel(
    make_recorder: RecorderFactory,
    amqp: AbstractConnection,
    store: ExecutionStore,
    redis: aioredis.Redis,
    uid: str,
) -> None:
    await make_recorder()
    run = Run(uid)
    pubsub = redis.pubsub()
    await pubsub.subscribe(events_channel(store.key_prefix, uid, run.execution_id))
    try:
        await publish_events(amqp, run.lifecycle())
        heard: list[dict[str, object]] = []
        async with asyncio.timeout(10):
            while len(heard) < 3:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    heard.append(orjson.loads(message["data"]))
        assert [m["status"] for m in heard] == ["admitted", "running", "completed"]
        record = await store.get(uid, run.execution_id)
        assert record is not None
        assert record.status == ExecutionStatus.COMPLETED
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_recorders_share_one_queue(
    make_recorder: RecorderFactory, amqp: AbstractConnection, store: ExecutionStore, uid: str
) -> None:
    # Small prefetch and batches so the broker spreads deliveries over both.
    first = await make_recorder(recorder_prefetch=5, recorder_batch_size=5)
    second = await make_recorder(recorder_prefetch=5, recorder_batch_size=5)
    runs = [Run(uid) for _ in range(100)]

    await publish_events(amqp, [event for run in runs for event in run.lifecycle()])

    await eventually(lambda: all_in(store, runs, ExecutionStatus.COMPLETED), what="records")
    assert first.stats.recorded > 0
    assert second.stats.recorded > 0
    await eventually(lambda: first.pending + second.pending == 0, what="acks")
    assert first.stats.acked + second.stats.acked == 30


async def test_python_m_recorder_records_and_stops_on_sigterm(
    amqp_url: str,
    amqp: AbstractConnection,
    store: ExecutionStore,
    uid: str,
    delete_queues: Callable[[str], None],
) -> None:
    settings = recorder_settings(amqp_url, uid)
    delete_queues(settings.recorder_queue)
    # Declared before any recorder runs (as a deployment does): events wait in it.
    await declare_recorder_queue(amqp, settings.recorder_queue, settings.recorder_binding_key)
    runs = [Run(uid) for _ in range(5)]
    await publish_events(amqp, [event for run in runs for event in run.lifecycle()])

    env = {
        **os.environ,
        "POLOS_AMQP_URL": amqp_url,
        "POLOS_REDIS_URL": settings.redis_url.get_secret_value(),
        "POLOS_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "POLOS_RECORDER_QUEUE": settings.recorder_queue,
        "POLOS_RECORDER_BINDING_KEY": settings.recorder_binding_key,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "recorder", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await eventually(lambda: all_in(store, runs, ExecutionStatus.COMPLETED), what="records")

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    assert b"Traceback" not in await process.stderr.read()
