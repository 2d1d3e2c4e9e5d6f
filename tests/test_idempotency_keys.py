"""Idempotency keys in Redis (``store/idempotency.py``): every ordering of two requests
with one key, staged step by step against the real Redis, and what each answer means
(``gateway.idempotency.decide``)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.idempotency import Verdict, decide
from store import StoreUnavailable
from store.idempotency import Held, Holder, IdempotencyKeys, Reservation


@pytest.fixture
def keys(redis: aioredis.Redis, uid: str) -> IdempotencyKeys:
    return IdempotencyKeys(
        redis, retention_seconds=600, lease_seconds=30, key_prefix=f"test:{uid}:"
    )


def wanted(
    keys: IdempotencyKeys, key: str = "k1", fp: str = "fp-a", project: str = "p"
) -> Reservation:
    return Reservation(keys.key(project, key), str(uuid.uuid4()), "2026-01-01T00:00:00Z", fp)


def holder(state: Held, fp: str = "fp-a") -> Holder:
    return Holder(state, "e1", "2026-01-01T00:00:00Z", fp, 1.0)


@pytest.mark.parametrize(
    ("found", "verdict"),
    [
        (None, Verdict.RESERVED),
        (holder(Held.DONE), Verdict.REPLAY),
        (holder(Held.PENDING), Verdict.WAIT),
        (holder(Held.STALE), Verdict.TAKE_OVER),
        (holder(Held.DONE, fp="fp-b"), Verdict.CONFLICT),
        (holder(Held.PENDING, fp="fp-b"), Verdict.CONFLICT),
        (holder(Held.STALE, fp="fp-b"), Verdict.CONFLICT),
    ],
)
def test_what_a_request_does_about_the_key_it_finds(found: Holder | None, verdict: Verdict) -> None:
    assert decide("fp-a", found) is verdict


async def test_the_first_request_reserves_and_the_second_finds_it_pending(
    keys: IdempotencyKeys,
) -> None:
    first, second = wanted(keys), wanted(keys)

    assert await keys.reserve([first]) == [None]
    [found] = await keys.reserve([second])

    assert found is not None
    assert (found.state, found.execution_id, found.created_at) == (
        Held.PENDING,
        first.execution_id,
        first.created_at,
    )
    assert found.fingerprint == "fp-a"
    assert 29 < found.lease_left_seconds <= 30


async def test_concurrent_reserves_of_one_key_leave_exactly_one_holder(
    keys: IdempotencyKeys,
) -> None:
    many = [wanted(keys) for _ in range(50)]

    results = await asyncio.gather(*(keys.reserve([w]) for w in many))

    winners = [w for w, [found] in zip(many, results, strict=True) if found is None]
    assert len(winners) == 1
    held_by = {found.execution_id for [found] in results if found is not None}
    assert held_by == {winners[0].execution_id}


async def test_a_completed_key_stands_for_its_execution_for_the_retention(
    keys: IdempotencyKeys, redis: aioredis.Redis
) -> None:
    first = wanted(keys)
    await keys.reserve([first])

    await keys.complete([(first.redis_key, first.execution_id)])

    [found] = await keys.reserve([wanted(keys)])
    assert found is not None
    assert (found.state, found.execution_id) == (Held.DONE, first.execution_id)
    assert 590 < await redis.ttl(first.redis_key) <= 600


async def test_a_released_key_is_free_for_the_next_request(keys: IdempotencyKeys) -> None:
    first, second = wanted(keys), wanted(keys)
    await keys.reserve([first])

    await keys.release([(first.redis_key, first.execution_id)])

    assert await keys.reserve([second]) == [None]


async def test_only_the_holder_completes_or_releases_its_reservation(
    keys: IdempotencyKeys,
) -> None:
    first = wanted(keys)
    await keys.reserve([first])

    await keys.complete([(first.redis_key, "someone-else")])
    await keys.release([(first.redis_key, "someone-else")])

    [found] = await keys.reserve([wanted(keys)])
    assert found is not None
    assert (found.state, found.execution_id) == (Held.PENDING, first.execution_id)


async def test_a_done_key_is_never_released(keys: IdempotencyKeys) -> None:
    first = wanted(keys)
    await keys.reserve([first])
    await keys.complete([(first.redis_key, first.execution_id)])

    await keys.release([(first.redis_key, first.execution_id)])

    [found] = await keys.reserve([wanted(keys)])
    assert found is not None
    assert found.state is Held.DONE


async def test_a_pending_key_whose_lease_passed_is_stale_and_one_request_takes_it_over(
    redis: aioredis.Redis, uid: str
) -> None:
    short = IdempotencyKeys(redis, lease_seconds=0.05, key_prefix=f"test:{uid}:")
    dead = wanted(short)
    await short.reserve([dead])
    await asyncio.sleep(0.1)
    retries = [wanted(short) for _ in range(10)]

    found = [f for [f] in await asyncio.gather(*(short.reserve([r]) for r in retries))]
    assert all(f is not None and f.state is Held.STALE for f in found)
    stale = found[0]
    assert stale is not None
    assert stale.execution_id == dead.execution_id
    taken = await asyncio.gather(*(short.take_over(stale, r) for r in retries))

    assert sum(taken) == 1
    winner = retries[taken.index(True)]
    [now] = await short.reserve([wanted(short)])
    assert now is not None
    assert (now.state, now.execution_id) == (Held.PENDING, winner.execution_id)
    # The dead holder, should it come back, can no longer complete the key.
    await short.complete([(dead.redis_key, dead.execution_id)])
    [still] = await short.reserve([wanted(short)])
    assert still is not None
    assert still.execution_id == winner.execution_id


async def test_a_live_lease_cannot_be_taken_over(keys: IdempotencyKeys) -> None:
    first = wanted(keys)
    await keys.reserve([first])
    [found] = await keys.reserve([wanted(keys)])
    assert found is not None

    assert not await keys.take_over(found, wanted(keys))


async def test_keys_are_per_project(keys: IdempotencyKeys) -> None:
    mine, theirs = wanted(keys, project="p1"), wanted(keys, project="p2")

    assert await keys.reserve([mine]) == [None]
    assert await keys.reserve([theirs]) == [None]


async def test_a_batch_reserves_many_keys_in_one_call(keys: IdempotencyKeys) -> None:
    taken = wanted(keys, key="a")
    await keys.reserve([taken])
    batch = [wanted(keys, key="a"), wanted(keys, key="b"), wanted(keys, key="c")]

    found = await keys.reserve(batch)

    assert found[0] is not None
    assert found[0].execution_id == taken.execution_id
    assert found[1:] == [None, None]


async def test_a_batch_items_key_never_meets_a_single_submits(keys: IdempotencyKeys) -> None:
    names = {
        keys.key("p", "0:k"),
        keys.batch_item_key("p", 0, "k"),
        keys.batch_item_key("p", 0, "1:k"),
        keys.batch_item_key("p", 10, "k"),
        keys.batch_item_key("p", 1, "0:k"),
    }
    assert len(names) == 5


async def test_redis_away_is_store_unavailable() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    keys = IdempotencyKeys(client, lease_seconds=1)
    try:
        with pytest.raises(StoreUnavailable):
            await keys.reserve([wanted(keys)])
    finally:
        await client.aclose()
