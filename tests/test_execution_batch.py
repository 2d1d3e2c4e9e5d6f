"""``POST /api/v1/workflows/batch_run``: validated as a whole (one bad item, nothing
published), answered in request order once every item is confirmed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from schemas.topology import submit_queue
from tests.conftest import assert_error, detail_fields, queue_exists
from tests.execution_support import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="module")

BATCH = "/api/v1/workflows/batch_run"
MAX_ITEMS = 25


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(
        amqp_url, tmp_path_factory.mktemp("batch"), gateway={"max_batch_items": MAX_ITEMS}
    ) as running:
        yield running


def fresh_queue(system: System) -> str:
    queue = f"b-{uuid.uuid4().hex[:6]}"
    system.queues.add(queue)
    return queue


async def post(system: System, body: Any) -> Any:
    return await system.client.post(BATCH, json=body, headers=system.headers)


async def test_a_batch_is_answered_in_request_order_and_every_item_runs(system: System) -> None:
    queues = [fresh_queue(system) for _ in range(3)]
    items: list[dict[str, Any]] = [
        {"workflow_id": "echo", "payload": {"i": i}, "queue_name": queues[i % 3]}
        for i in range(MAX_ITEMS)
    ]
    items[3] = {"workflow_id": "fail", "payload": 3, "queue_name": queues[0]}

    response = await post(system, {"workflows": items, "session_id": "batch-s", "user_id": "u9"})

    assert response.status == 200, await response.text()
    executions = (await response.json())["executions"]
    assert len(executions) == MAX_ITEMS
    assert all(set(e) == {"execution_id", "created_at"} for e in executions)
    ids = [e["execution_id"] for e in executions]
    assert len(set(ids)) == MAX_ITEMS
    records = await asyncio.gather(*(system.wait_status(e, "completed", "failed") for e in ids))
    for i, record in enumerate(records):
        if i == 3:
            assert (record["workflow_id"], record["status"]) == ("fail", "failed")
            continue
        assert record["workflow_id"] == "echo"
        assert record["result"]["echo"] == {"i": i}
        assert record["queue_name"] == queues[i % 3]
        assert (record["session_id"], record["user_id"]) == ("batch-s", "u9")


async def test_one_invalid_item_rejects_the_batch_naming_its_index(system: System) -> None:
    queue = fresh_queue(system)
    items: list[dict[str, Any]] = [
        {"workflow_id": "echo", "payload": i, "queue_name": queue} for i in range(5)
    ]
    items[2]["queue_concurrency_limit"] = 0
    items[4] = {"workflow_id": "echo", "queue_name": queue}  # no payload

    body = await assert_error(await post(system, {"workflows": items}), 400, "VALIDATION_ERROR")

    assert sorted(detail_fields(body)) == [
        "workflows.2.queue_concurrency_limit",
        "workflows.4.payload",
    ]
    assert not await queue_exists(system.amqp, submit_queue(system.project, queue))


async def test_a_rule_broken_by_one_item_rejects_the_batch(system: System) -> None:
    queue = fresh_queue(system)
    items: list[dict[str, Any]] = [
        {"workflow_id": "echo", "payload": 1, "queue_name": queue},
        {"workflow_id": "echo", "payload": 2, "queue_name": queue, "run_timeout_seconds": 10**6},
        {"workflow_id": "bad/id", "payload": 3},  # not a queue name, none given
    ]
    body = await assert_error(await post(system, {"workflows": items}), 400, "VALIDATION_ERROR")
    assert detail_fields(body) == ["workflows.1.run_timeout_seconds", "workflows.2.queue_name"]
    assert not await queue_exists(system.amqp, submit_queue(system.project, queue))


async def test_an_unknown_workflow_or_deployment_rejects_the_batch(system: System) -> None:
    queue = fresh_queue(system)
    items = [
        {"workflow_id": "echo", "payload": 1, "queue_name": queue},
        {"workflow_id": "nope", "payload": 2, "queue_name": queue},
    ]
    body = await assert_error(await post(system, {"workflows": items}), 404, "WORKFLOW_NOT_FOUND")
    assert detail_fields(body) == ["workflows.1.workflow_id"]
    body = await assert_error(
        await post(system, {"workflows": items[:1], "deployment_id": "v999"}),
        404,
        "DEPLOYMENT_NOT_FOUND",
    )
    assert detail_fields(body) == ["workflows.0.deployment_id"]
    # "" is an unknown deployment, not the batch's nor the latest.
    body = await assert_error(
        await post(
            system,
            {"workflows": [{**items[0], "deployment_id": ""}], "deployment_id": "v1"},
        ),
        404,
        "DEPLOYMENT_NOT_FOUND",
    )
    assert detail_fields(body) == ["workflows.0.deployment_id"]
    assert not await queue_exists(system.amqp, submit_queue(system.project, queue))


async def test_too_many_items_is_400(system: System) -> None:
    queue = fresh_queue(system)
    items = [{"workflow_id": "echo", "payload": i, "queue_name": queue} for i in range(26)]
    body = await assert_error(await post(system, {"workflows": items}), 400, "VALIDATION_ERROR")
    assert detail_fields(body) == ["workflows"]
    assert str(MAX_ITEMS) in body["details"][0]["message"]
    assert not await queue_exists(system.amqp, submit_queue(system.project, queue))


async def test_malformed_batches(system: System) -> None:
    client = system.client
    for body, field in [
        ({}, "workflows"),
        ({"workflows": "echo"}, "workflows"),
        ({"workflows": [{"payload": 1}]}, "workflows.0.workflow_id"),
        ({"workflows": [], "session_id": 5}, "session_id"),
    ]:
        error = await assert_error(await post(system, body), 400)
        assert field in detail_fields(error), (body, error)
    for raw in [b"{", b'{"workflows": [{"workflow_id": "echo", "payload": NaN}]}']:
        error = await assert_error(
            await client.post(BATCH, data=raw, headers={**system.headers, "Content-Type": _JSON}),
            400,
            "INVALID_JSON",
        )
        assert detail_fields(error) == ["body"]
    await assert_error(
        await client.post(BATCH, data=b"{}", headers={**system.headers, "Content-Type": "text/x"}),
        415,
    )
    await assert_error(await client.post(BATCH, json={"workflows": []}), 401)


_JSON = "application/json"


async def test_an_empty_batch_is_an_empty_answer(system: System) -> None:
    response = await post(system, {"workflows": []})
    assert response.status == 200
    assert await response.json() == {"executions": []}


async def test_items_take_the_batch_defaults_unless_they_say_otherwise(system: System) -> None:
    queue = fresh_queue(system)
    response = await post(
        system,
        {
            "workflows": [
                {"workflow_id": "echo", "payload": 0, "queue_name": queue},
                {"workflow_id": "echo", "payload": 1, "queue_name": queue, "user_id": "own"},
            ],
            "deployment_id": "v1",
            "user_id": "shared",
            "parent_execution_id": "parent-1",
            "batch_id": "ignored",
        },
    )
    assert response.status == 200, await response.text()
    first, second = [e["execution_id"] for e in (await response.json())["executions"]]
    a = await system.wait_status(first, "completed")
    b = await system.wait_status(second, "completed")
    assert (a["user_id"], b["user_id"]) == ("shared", "own")
    assert a["parent_execution_id"] == b["parent_execution_id"] == "parent-1"
    assert a["session_id"] == b["session_id"], "one session for the batch"


async def test_polos_sdk_batch_invoke(system: System) -> None:
    from polos.core.context import WorkflowContext
    from polos.core.workflow import workflow
    from polos.runtime.client import PolosClient
    from polos.types.types import BatchWorkflowInput

    # batch_invoke looks the workflows up in the SDK's own registry.
    @workflow(id="echo")  # type: ignore[untyped-decorator]
    async def echo(ctx: WorkflowContext, payload: dict[str, Any]) -> Any:  # pragma: no cover
        return payload

    client = PolosClient(
        api_url=str(system.client.make_url("")).rstrip("/"),
        api_key=system.tenant.api_key,
        project_id=system.project,
    )
    system.queues.add("echo")

    handles = await client.batch_invoke(
        [BatchWorkflowInput(id="echo", payload={"n": n}) for n in range(4)], user_id="sdk-user"
    )

    assert len(handles) == 4
    for n, handle in enumerate(handles):
        assert handle.workflow_id == "echo"
        record = await system.wait_status(handle.id, "completed")
        assert record["result"]["echo"] == {"n": n}
        assert record["user_id"] == "sdk-user"


async def test_a_batchs_queued_events_reach_the_broker_as_one_message(system: System) -> None:
    queues = [fresh_queue(system) for _ in range(2)]
    items = [{"workflow_id": "echo", "payload": i, "queue_name": queues[i % 2]} for i in range(20)]
    response = await post(system, {"workflows": items})
    assert response.status == 200, await response.text()
    ids = {e["execution_id"] for e in (await response.json())["executions"]}

    log = system.events
    await log.wait_for(
        lambda: ids <= {e.execution_id for e in log.events if e.status == "queued"},
        what="the queued events",
    )
    carrying = [
        b for b in log.batches if any(e.execution_id in ids for e in b if e.status == "queued")
    ]
    assert len(carrying) == 1
    assert {e.execution_id for e in carrying[0]} == ids
