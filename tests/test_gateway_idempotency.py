"""``Idempotency-Key``: the same key and the same request answer the same execution and run
it once, whichever gateway gets the retry, whatever the races; another request with the
key is refused; a key never makes a submission without one depend on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr
from yarl import URL

from broker.registry import register_deployment
from gateway import submission
from gateway.context import APP_LINK, APP_REDIS, APP_SETTINGS
from gateway.idempotency import fingerprint
from schemas.api import SubmitWorkflowRequest
from schemas.topology import submit_queue
from store.idempotency import IdempotencyKeys, Reservation
from tests.conftest import (
    Tenant,
    assert_error,
    new_tenant,
    queue_depth,
    queue_exists,
    running_gateway,
)
from tests.dispatcher_support import DEPLOYMENT
from tests.execution_support import System, running_system
from tests.proxy import running_proxy
from tests.redis_proxy import redis_proxy
from tests.store_support import redis_client, redis_host_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

Client = TestClient[web.Request, web.Application]
BATCH = "/api/v1/workflows/batch_run"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(
        amqp_url, tmp_path_factory.mktemp("idempotency"), gateway={"idempotency_wait_seconds": 3}
    ) as running:
        yield running


class Idle:
    """A second project that no dispatcher serves: what the gateway published stays in
    its queues, to be counted; its queues hold at most two messages."""

    def __init__(self, system: System, tenant: Tenant, client: Client) -> None:
        self.system = system
        self.tenant = tenant
        self.client = client
        self.queues: set[str] = set()

    def queue(self) -> str:
        name = f"i-{uuid.uuid4().hex[:6]}"
        self.queues.add(name)
        return name

    async def depth(self, queue: str) -> int:
        return await queue_depth(self.system.amqp, submit_queue(self.tenant.project_id, queue))

    async def post(self, path: str, body: Any, key: str | None = None) -> Any:
        headers = dict(self.tenant.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(path, json=body, headers=headers)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idle(system: System) -> AsyncIterator[Idle]:
    tenant = new_tenant(system.tenant.projects_file)
    await register_deployment(system.amqp_url, tenant.project_id, DEPLOYMENT, ["echo"])
    settings = system.settings.model_copy(update={"queue_max_length": 2})
    async with running_gateway(settings) as client:
        lone = Idle(system, tenant, client)
        yield lone
    for queue in lone.queues:
        with contextlib.suppress(Exception):
            async with system.amqp.channel() as channel:
                await channel.queue_delete(submit_queue(tenant.project_id, queue))


def fresh_queue(system: System) -> str:
    queue = f"k-{uuid.uuid4().hex[:6]}"
    system.queues.add(queue)
    return queue


async def post(
    client: Client, system: System, body: Any, key: str | None, workflow: str = "echo"
) -> Any:
    headers = dict(system.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await client.post(f"/api/v1/workflows/{workflow}/run", json=body, headers=headers)


async def accepted(response: Any) -> dict[str, str]:
    assert response.status == 200, await response.text()
    body: dict[str, str] = await response.json()
    return body


def ran(system: System, queue: str) -> set[str]:
    """The executions of ``queue`` that a worker ran (reported running, or ended by a
    worker: a short run is never reported running)."""
    return {
        e.execution_id
        for e in system.events.events
        if e.queue_name == queue and e.worker_id is not None
    }


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


# -- single submits ------------------------------------------------------------------


async def test_a_retry_with_the_same_key_answers_the_same_execution_and_it_runs_once(
    system: System,
) -> None:
    queue, key = fresh_queue(system), new_key()
    body = {"payload": {"n": 1}, "queue_name": queue}

    first = await accepted(await post(system.client, system, body, key))
    await system.wait_status(first["execution_id"], "completed")
    retry = await post(system.client, system, body, key)

    assert await accepted(retry) == first
    assert retry.headers["Idempotent-Replayed"] == "true"
    without_key = await accepted(await post(system.client, system, body, None))
    assert without_key["execution_id"] != first["execution_id"]
    await system.wait_status(without_key["execution_id"], "completed")
    assert ran(system, queue) == {first["execution_id"], without_key["execution_id"]}


async def test_concurrent_requests_with_one_key_on_two_gateways_run_one_execution(
    system: System,
) -> None:
    queue, key = fresh_queue(system), new_key()
    body = {"payload": "race", "queue_name": queue}
    async with running_gateway(system.settings) as other:
        responses = await asyncio.gather(
            *(post(c, system, body, key) for c in [system.client, other] * 10)
        )
        answers = [await accepted(r) for r in responses]

    assert len({(a["execution_id"], a["created_at"]) for a in answers}) == 1
    execution_id = answers[0]["execution_id"]
    await system.wait_status(execution_id, "completed")
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count("true") == 19
    await asyncio.sleep(0.3)  # a second execution, if any, would have started by now
    assert ran(system, queue) == {execution_id}


async def test_a_key_outlives_the_gateway_that_accepted_it(system: System) -> None:
    key = new_key()
    body = {"payload": None, "queue_name": fresh_queue(system)}
    async with running_gateway(system.settings) as first_gateway:
        first = await accepted(await post(first_gateway, system, body, key))

    async with running_gateway(system.settings) as restarted:
        assert await accepted(await post(restarted, system, body, key)) == first


async def test_the_same_key_with_another_request_is_refused_and_publishes_nothing(
    system: System, idle: Idle
) -> None:
    key, queue = new_key(), idle.queue()
    idle.queues.add("echo")
    await accepted(await idle.post("/api/v1/workflows/echo/run", {"payload": 1}, key))

    for other in ({"payload": 2}, {"payload": 1, "queue_name": queue}):
        response = await idle.post("/api/v1/workflows/echo/run", other, key)
        body = await assert_error(response, 422, "IDEMPOTENCY_KEY_REUSED")
        assert body["details"] == [
            {"field": "Idempotency-Key", "message": "already used with a different request"}
        ]
    assert not await queue_exists(system.amqp, submit_queue(idle.tenant.project_id, queue))
    assert await idle.depth("echo") == 1


async def test_keys_belong_to_their_project(system: System, idle: Idle) -> None:
    key, body = new_key(), {"payload": "same", "queue_name": idle.queue()}
    system.queues.add(body["queue_name"])

    theirs = await accepted(await idle.post("/api/v1/workflows/echo/run", body, key))
    mine = await accepted(await post(system.client, system, body, key))

    assert mine["execution_id"] != theirs["execution_id"]


async def test_an_invalid_key_is_a_400_and_publishes_nothing(system: System, idle: Idle) -> None:
    queue = idle.queue()
    for key in ("", "x" * 256, "with space"):
        response = await idle.post(
            "/api/v1/workflows/echo/run", {"payload": 1, "queue_name": queue}, key
        )
        body = await assert_error(response, 400, "INVALID_IDEMPOTENCY_KEY")
        assert body["details"][0]["field"] == "Idempotency-Key"
    assert not await queue_exists(system.amqp, submit_queue(idle.tenant.project_id, queue))


# -- races with a gateway that is still publishing, or died ---------------------------


async def test_a_retry_while_the_first_still_publishes_waits_for_its_answer(
    system: System,
) -> None:
    queue, key = fresh_queue(system), new_key()
    body = {"payload": "slow confirm", "queue_name": queue}
    url = URL(system.amqp_url)
    async with (
        running_proxy(url.host or "127.0.0.1", url.port or 5672) as proxy,
        running_gateway(
            system.settings.model_copy(update={"amqp_url": SecretStr(proxy.url(system.amqp_url))})
        ) as held,
    ):
        plain = await accepted(await post(held, system, {"payload": 0, "queue_name": queue}, None))
        proxy.hold()  # the broker stops answering: no confirm arrives
        first = asyncio.create_task(post(held, system, body, key))
        await asyncio.sleep(0.3)
        retry = asyncio.create_task(post(held, system, body, key))
        await asyncio.sleep(0.3)
        assert not first.done()
        assert not retry.done()
        proxy.release()
        answers = [await accepted(await first), await accepted(await retry)]

    assert answers[0] == answers[1]
    await system.wait_status(answers[0]["execution_id"], "completed")
    await system.wait_status(plain["execution_id"], "completed")
    assert ran(system, queue) == {answers[0]["execution_id"], plain["execution_id"]}


async def test_a_retry_that_waited_long_enough_is_told_to_come_back(system: System) -> None:
    queue, key = fresh_queue(system), new_key()
    body = {"payload": "slower confirm", "queue_name": queue}
    url = URL(system.amqp_url)
    settings = system.settings.model_copy(update={"idempotency_wait_seconds": 0.2})
    async with running_proxy(url.host or "127.0.0.1", url.port or 5672) as proxy:
        settings = settings.model_copy(update={"amqp_url": SecretStr(proxy.url(system.amqp_url))})
        async with running_gateway(settings) as held:
            await accepted(await post(held, system, {"payload": 0, "queue_name": queue}, None))
            proxy.hold()
            first = asyncio.create_task(post(held, system, body, key))
            await asyncio.sleep(0.2)

            busy = await assert_error(
                await post(held, system, body, key), 409, "IDEMPOTENCY_KEY_IN_PROGRESS"
            )
            proxy.release()
            answer = await accepted(await first)

    assert busy["details"] == [
        {"field": "Idempotency-Key", "message": "a request with it is in progress"}
    ]
    assert await accepted(await post(system.client, system, body, key)) == answer


def _dead_holder(system: System) -> IdempotencyKeys:
    """The keys as a gateway that died saw them: its lease is already over."""
    redis = system.client.app[APP_REDIS]
    return IdempotencyKeys(redis, lease_seconds=0.05, key_prefix=system.settings.redis_key_prefix)


async def _reserve_as_dead_gateway(
    system: System, key: str, body: dict[str, Any]
) -> submission.Stamped:
    request = SubmitWorkflowRequest.model_validate(body)
    stamped = submission.stamp(
        project_id=system.project,
        workflow_id="echo",
        deployment_id=DEPLOYMENT,
        queue_name=body["queue_name"],
        run_timeout=60,
        body=request,
        submitted_by="dead-gateway",
    )
    keys = _dead_holder(system)
    reservation = Reservation(
        keys.key(system.project, key),
        stamped.execution_id,
        stamped.created_at,
        fingerprint("echo", request),
    )
    assert await keys.reserve([reservation]) == [None]
    return stamped


async def test_a_gateway_that_died_after_its_publish_leaves_a_key_the_retry_answers(
    system: System,
) -> None:
    queue, key = fresh_queue(system), new_key()
    body = {"payload": "published, then died", "queue_name": queue}
    stamped = await _reserve_as_dead_gateway(system, key, body)
    app = system.client.app
    await submission.publish(app[APP_LINK], app[APP_SETTINGS], stamped)  # ... and no complete
    await system.wait_status(stamped.execution_id, "completed")

    retry = await accepted(await post(system.client, system, body, key))

    assert retry == {"execution_id": stamped.execution_id, "created_at": stamped.created_at}
    again = await post(system.client, system, body, key)
    assert (await accepted(again), again.headers["Idempotent-Replayed"]) == (retry, "true")
    await asyncio.sleep(0.3)
    assert ran(system, queue) == {stamped.execution_id}


async def test_a_gateway_that_died_before_its_publish_leaves_a_key_the_retry_takes_over(
    system: System,
) -> None:
    queue, key = fresh_queue(system), new_key()
    body = {"payload": "died before publishing", "queue_name": queue}
    dead = await _reserve_as_dead_gateway(system, key, body)
    await asyncio.sleep(0.1)

    retry = await accepted(await post(system.client, system, body, key))

    assert retry["execution_id"] != dead.execution_id
    await system.wait_status(retry["execution_id"], "completed")
    assert await accepted(await post(system.client, system, body, key)) == retry
    assert ran(system, queue) == {retry["execution_id"]}


# -- Redis away -----------------------------------------------------------------------


async def test_redis_away_fails_only_submissions_with_a_key(system: System, idle: Idle) -> None:
    queue = idle.queue()
    async with redis_proxy(*redis_host_port()) as proxy:
        settings = system.settings.model_copy(update={"redis_url": SecretStr(proxy.url())})
        async with running_gateway(settings) as gateway:
            headers = idle.tenant.headers
            path = "/api/v1/workflows/echo/run"
            body = {"payload": 1, "queue_name": queue}
            proxy.cut()

            plain = await gateway.post(path, json=body, headers=headers)
            keyed = await gateway.post(
                path, json=body, headers={**headers, "Idempotency-Key": new_key()}
            )

            await accepted(plain)
            await assert_error(keyed, 503, "STORE_UNAVAILABLE")
            assert keyed.headers["Retry-After"] == "1"
            assert await idle.depth(queue) == 1
            proxy.restore()
            key = new_key()
            again = await gateway.post(path, json=body, headers={**headers, "Idempotency-Key": key})
            await accepted(again)
            assert await idle.depth(queue) == 2


# -- batches ----------------------------------------------------------------------------


async def test_a_batch_retried_with_its_key_answers_as_before_and_publishes_nothing_more(
    system: System, idle: Idle
) -> None:
    queue, key = idle.queue(), new_key()
    batch = {
        "workflows": [{"workflow_id": "echo", "payload": i, "queue_name": queue} for i in range(2)]
    }

    first = await idle.post(BATCH, batch, key)
    assert first.status == 200, await first.text()
    retry = await idle.post(BATCH, batch, key)

    assert retry.status == 200
    assert await retry.json() == await first.json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert await idle.depth(queue) == 2
    changed = {
        "workflows": [
            *batch["workflows"],
            {"workflow_id": "echo", "payload": 9, "queue_name": queue},
        ]
    }
    body = await assert_error(await idle.post(BATCH, changed, key), 422, "IDEMPOTENCY_KEY_REUSED")
    # The new third item had no key yet: it was reserved, and released again.
    assert [d["field"] for d in body["details"]] == [
        f"Idempotency-Key (workflows.{i})" for i in range(2)
    ]
    assert await idle.depth(queue) == 2


async def test_items_with_their_own_keys_are_idempotent_one_by_one(
    system: System, idle: Idle
) -> None:
    queue, key = idle.queue(), new_key()
    single = await accepted(
        await idle.post("/api/v1/workflows/echo/run", {"payload": "a", "queue_name": queue}, key)
    )
    items = [
        {"workflow_id": "echo", "payload": "a", "queue_name": queue, "idempotency_key": key},
        {"workflow_id": "echo", "payload": "b", "queue_name": queue},
    ]

    response = await idle.post(BATCH, {"workflows": items})

    assert response.status == 200, await response.text()
    executions = (await response.json())["executions"]
    assert executions[0] == single
    assert await idle.depth(queue) == 2
    items[0]["payload"] = "changed"
    body = await assert_error(
        await idle.post(BATCH, {"workflows": items}), 422, "IDEMPOTENCY_KEY_REUSED"
    )
    assert [d["field"] for d in body["details"]] == ["workflows.0.idempotency_key"]
    assert await idle.depth(queue) == 2


async def test_two_items_of_a_batch_cannot_share_a_key(system: System, idle: Idle) -> None:
    queue, key = idle.queue(), new_key()
    items = [
        {"workflow_id": "echo", "payload": i, "queue_name": queue, "idempotency_key": key}
        for i in range(2)
    ]

    body = await assert_error(await idle.post(BATCH, {"workflows": items}), 400, "VALIDATION_ERROR")

    assert body["details"] == [
        {"field": "workflows.1.idempotency_key", "message": "the same key as workflows.0"}
    ]
    assert not await queue_exists(system.amqp, submit_queue(idle.tenant.project_id, queue))


async def test_a_partly_accepted_batch_retried_with_its_key_publishes_only_the_rest(
    system: System, idle: Idle
) -> None:
    free, full, key = idle.queue(), idle.queue(), new_key()
    path = "/api/v1/workflows/echo/run"
    # RabbitMQ 3.10 admits one message beyond x-max-length: fill until it refuses.
    while (await idle.post(path, {"payload": "fill", "queue_name": full})).status == 200:
        pass
    batch = {
        "workflows": [
            {"workflow_id": "echo", "payload": 0, "queue_name": free},
            {"workflow_id": "echo", "payload": 1, "queue_name": full},
        ]
    }

    partial = await assert_error(await idle.post(BATCH, batch, key), 429, "BATCH_INCOMPLETE")
    accepted_id = partial["details"][0]["message"].removeprefix("accepted as ")
    async with system.amqp.channel() as channel:
        queue = await channel.declare_queue(
            submit_queue(idle.tenant.project_id, full), passive=True
        )
        await queue.purge()
    retry = await idle.post(BATCH, batch, key)

    assert retry.status == 200, await retry.text()
    executions = (await retry.json())["executions"]
    assert executions[0]["execution_id"] == accepted_id
    assert "Idempotent-Replayed" not in retry.headers
    assert (await idle.depth(free), await idle.depth(full)) == (1, 1)


async def test_keys_are_kept_in_redis_for_the_retention(system: System, idle: Idle) -> None:
    key, body = new_key(), {"payload": 1, "queue_name": idle.queue()}
    await accepted(await idle.post("/api/v1/workflows/echo/run", body, key))
    prefix = system.settings.redis_key_prefix
    name = f"{prefix}idem:{{{idle.tenant.project_id}}}:k:{key}"

    async with redis_client(f"{prefix}never:") as redis:
        ttl = await redis.ttl(name)
        state = await redis.hget(name, "state")

    assert state == b"done"
    assert 24 * 3600 - 60 < ttl <= 24 * 3600
