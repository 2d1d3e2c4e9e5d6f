"""``store.pipelining.AutoPipeline``: concurrent script calls share round trips, and each
caller gets its own reply or error, against the real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from store.pipelining import AutoPipeline, Script

ECHO = Script("return ARGV[1]")
FAIL_ON_BOOM = Script("if ARGV[1] == 'boom' then return redis.error_reply('boom') end return 1")


async def test_every_concurrent_caller_gets_its_own_reply(redis: aioredis.Redis) -> None:
    calls = AutoPipeline(redis)

    replies = await asyncio.gather(*(calls.evalsha(ECHO, ["k"], [f"v{i}"]) for i in range(200)))

    assert replies == [f"v{i}".encode() for i in range(200)]


async def test_a_script_redis_has_never_seen_is_loaded_and_run(redis: aioredis.Redis) -> None:
    unseen = Script(f"return '{uuid.uuid4()}'")
    assert await redis.script_exists(unseen.sha) == [False]

    reply = await AutoPipeline(redis).evalsha(unseen, [], [])

    assert reply.decode() in unseen.text


async def test_an_error_reaches_only_its_caller(redis: aioredis.Redis) -> None:
    calls = AutoPipeline(redis)

    outcomes = await asyncio.gather(
        *(calls.evalsha(FAIL_ON_BOOM, ["k"], [v]) for v in ("ok", "boom", "ok")),
        return_exceptions=True,
    )

    assert outcomes[0] == 1
    assert outcomes[2] == 1
    assert isinstance(outcomes[1], redis_errors.ResponseError)


async def test_redis_away_fails_every_waiting_caller() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    calls = AutoPipeline(client)
    try:
        outcomes = await asyncio.gather(
            *(calls.evalsha(ECHO, ["k"], ["v"]) for _ in range(5)), return_exceptions=True
        )
    finally:
        await client.aclose()

    assert all(isinstance(o, redis_errors.ConnectionError) for o in outcomes), outcomes


@pytest.mark.parametrize("cancelled", [0, 1])
async def test_a_caller_that_gives_up_leaves_the_others_their_replies(
    redis: aioredis.Redis, cancelled: int
) -> None:
    calls = AutoPipeline(redis)
    tasks = [asyncio.create_task(calls.evalsha(ECHO, ["k"], [str(i)])) for i in range(3)]
    await asyncio.sleep(0)
    tasks[cancelled].cancel()

    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(outcomes[cancelled], asyncio.CancelledError)
    assert [o for i, o in enumerate(outcomes) if i != cancelled] == [
        str(i).encode() for i in range(3) if i != cancelled
    ]
