"""What became of an execution: ``GET /api/v1/executions/{id}`` and a workflow's runs,
read from the execution store the recorder keeps, with the submit's auth."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.auth import digest_key, key_id_for
from gateway.context import APP_REDIS
from schemas.dispatch import ExecutionStatus
from tests.conftest import assert_error, detail_fields, new_tenant, running_gateway
from tests.execution_support import System, running_system
from tests.store_support import Run, publish_events

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(amqp_url, tmp_path_factory.mktemp("status")) as running:
        yield running


async def test_a_record_exists_from_the_moment_the_submission_is_accepted(
    system: System,
) -> None:
    execution_id = await system.submit("echo", payload={"n": 1}, queue_name="parked")
    # The very first read after the 200 finds it (whatever it has become by then).
    record = await system.get(execution_id)
    assert record["status"] in ("queued", "admitted", "running", "completed")
    assert record["id"] == execution_id
    assert record["workflow_id"] == "echo"
    assert record["payload"] == {"n": 1}
    assert record["queue_name"] == "parked"
    assert record["project_id"] == system.project


async def test_a_completed_execution_has_the_workers_result_and_polos_fields(
    system: System,
) -> None:
    execution_id = await system.submit(
        "echo", payload={"hello": "world"}, session_id="s-1", user_id="u-1", run_timeout_seconds=60
    )
    record = await system.wait_status(execution_id, "completed")

    assert record["result"]["echo"] == {"hello": "world"}
    assert record["error"] is None
    assert record["session_id"] == "s-1"
    assert record["user_id"] == "u-1"
    assert record["run_timeout_seconds"] == 60
    assert record["deployment_id"] == "v1"
    assert record["queue_name"] == "echo"
    assert record["worker_id"] == record["result"]["worker_id"]
    for stamp in ("created_at", "admitted_at", "started_at", "completed_at"):
        assert record[stamp], stamp
    assert record["created_at"] <= record["admitted_at"] <= record["started_at"]
    assert record["started_at"] <= record["completed_at"]
    assert record["duplicate_of"] is None
    assert record["cancelled_at"] is None


async def test_a_failed_execution_has_the_error_as_polos_sends_it(system: System) -> None:
    execution_id = await system.submit("fail", payload=7)
    record = await system.wait_status(execution_id, "failed")
    assert record["error"] == "ValueError: cannot handle 7"
    assert record["error_details"]["type"] == "ValueError"
    assert "Traceback" in record["error_details"]["traceback"]


async def test_a_retried_execution_shows_its_retry_count_and_each_failed_runs_error(
    system: System,
) -> None:
    execution_id = await system.submit("flaky", payload=None)
    record = await system.wait_status(execution_id, "completed")
    assert record["result"] == {"retry_count": 1}
    assert record["retry_count"] == 1
    assert record["error"] is None
    [failure] = record["attempt_errors"]
    assert failure["attempt"] == 1
    assert failure["error"] == "ConnectionError: run 1 lost its link"
    assert "Traceback" in failure["error_details"]["traceback"]
    assert record["started_at"] <= failure["at"] <= failure["retry_at"] <= record["completed_at"]
    listing = await system.client.get("/api/v1/workflows/flaky/runs", headers=system.headers)
    [row] = (await listing.json())["executions"]
    assert (row["id"], row["retry_count"], len(row["attempt_errors"])) == (execution_id, 1, 1)


async def test_unknown_execution_is_404_and_a_malformed_id_is_400(system: System) -> None:
    unknown = await system.client.get(f"/api/v1/executions/{uuid.uuid4()}", headers=system.headers)
    await assert_error(unknown, 404, "EXECUTION_NOT_FOUND")
    for bad in ("not-a-uuid", "1234", "0190b6c5-2b1a-7c3d-8e4f"):
        response = await system.client.get(f"/api/v1/executions/{bad}", headers=system.headers)
        body = await assert_error(response, 400, "INVALID_EXECUTION_ID")
        assert detail_fields(body) == ["execution_id"]
    # A UUID and a newline: "$" would match before the newline, a full match does not.
    bad = f"{uuid.uuid4()}%0A"
    for response in (
        await system.client.get(f"/api/v1/executions/{bad}", headers=system.headers),
        await system.client.post(f"/api/v1/executions/{bad}/cancel", headers=system.headers),
        await system.client.get(f"/api/v1/executions/{bad}/events", headers=system.headers),
    ):
        body = await assert_error(response, 400, "INVALID_EXECUTION_ID")
        assert detail_fields(body) == ["execution_id"]


async def test_an_uppercase_id_finds_the_same_execution(system: System) -> None:
    execution_id = await system.submit("echo")
    await system.wait_status(execution_id, "completed")
    response = await system.client.get(
        f"/api/v1/executions/{execution_id.upper()}", headers=system.headers
    )
    assert response.status == 200
    assert (await response.json())["id"] == execution_id


async def test_status_needs_the_same_auth_as_submit(
    system: System, tmp_path_factory: pytest.TempPathFactory
) -> None:
    execution_id = await system.submit("echo")
    await system.wait_status(execution_id, "completed")
    path = f"/api/v1/executions/{execution_id}"
    client = system.client

    await assert_error(await client.get(path), 401, "UNAUTHORIZED")
    await assert_error(
        await client.get(
            path, headers={"Authorization": "Bearer wrong", "X-Project-ID": system.project}
        ),
        401,
    )
    await assert_error(
        await client.get(path, headers={"Authorization": f"Bearer {system.tenant.api_key}"}),
        400,
        "MISSING_PROJECT_ID",
    )
    # The cookie works as the header does.
    response = await client.get(
        path,
        headers={"X-Project-ID": system.project},
        cookies={"polos_auth": system.tenant.api_key},
    )
    assert response.status == 200

    # Another project's key: 403 with our project id, and with its own project the
    # execution does not exist for it (404, not 403: its existence is not revealed).
    other = new_tenant(system.tenant.projects_file)
    await _reload_keys(system)
    await assert_error(
        await client.get(
            path,
            headers={"Authorization": f"Bearer {other.api_key}", "X-Project-ID": system.project},
        ),
        403,
        "FORBIDDEN",
    )
    await assert_error(await client.get(path, headers=other.headers), 404, "EXECUTION_NOT_FOUND")


async def _reload_keys(system: System) -> None:
    from gateway.context import APP_KEYS

    system.client.app[APP_KEYS].load()


async def test_runs_of_a_workflow_newest_first_paginated_and_filtered(system: System) -> None:
    queue = f"runs-{uuid.uuid4().hex[:6]}"
    ids = []
    for n in range(5):
        ids.append(await system.submit("echo", payload={"n": n}, queue_name=queue))
    failed = await system.submit("fail", payload="x", queue_name=queue)
    for execution_id in ids:
        await system.wait_status(execution_id, "completed")
    await system.wait_status(failed, "failed")

    async def page(**query: Any) -> dict[str, Any]:
        response = await system.client.get(
            "/api/v1/workflows/echo/runs",
            params={k: str(v) for k, v in query.items()},
            headers=system.headers,
        )
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    seen: list[str] = []
    cursor = None
    while True:
        query: dict[str, Any] = {"limit": 2}
        if cursor:
            query["cursor"] = cursor
        body = await page(**query)
        assert len(body["executions"]) <= 2
        seen += [e["id"] for e in body["executions"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    mine = [e for e in seen if e in ids]
    assert mine == list(reversed(ids)), "newest first, every run once"
    assert len(seen) == len(set(seen))

    completed = await page(status="completed", limit=1000)
    assert set(ids) <= {e["id"] for e in completed["executions"]}
    assert all(e["status"] == "completed" for e in completed["executions"])
    fails = await system.client.get(
        "/api/v1/workflows/fail/runs", params={"status": "failed"}, headers=system.headers
    )
    assert failed in [e["id"] for e in (await fails.json())["executions"]]
    empty = await page(status="cancelled")
    assert [e["id"] for e in empty["executions"] if e["id"] in ids] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "finished"}, "status"),
        ({"status": ""}, "status"),  # not "any status"
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
async def test_runs_with_a_bad_query_is_400_naming_it(
    system: System, query: dict[str, str], field: str
) -> None:
    response = await system.client.get(
        "/api/v1/workflows/echo/runs", params=query, headers=system.headers
    )
    body = await assert_error(response, 400, "VALIDATION_ERROR")
    assert detail_fields(body) == [field]


async def test_runs_need_auth_and_see_only_the_projects_own(system: System) -> None:
    await assert_error(await system.client.get("/api/v1/workflows/echo/runs"), 401)
    other = new_tenant(system.tenant.projects_file)
    await _reload_keys(system)
    response = await system.client.get("/api/v1/workflows/echo/runs", headers=other.headers)
    assert response.status == 200
    assert await response.json() == {"executions": [], "next_cursor": None}


async def test_a_thousand_reads_at_once_all_answer_while_redis_is_healthy(
    system: System,
) -> None:
    """Far more reads at once than store connections: they wait for one, none is a 503."""
    execution_id = await system.submit("echo")
    await system.wait_status(execution_id, "completed")
    paths = [
        f"/api/v1/executions/{execution_id}",
        "/api/v1/workflows/echo/runs?limit=5",
        f"/api/v1/executions/{execution_id}/events",
    ]
    # The whole system shares this test's one process and its event loop, so a
    # read may wait long for the CPU, and so for a connection: the bound on that
    # wait is not what this test is about (on main a read did not wait at all), nor
    # is the bound on one command's reply, which the same CPU wait can exceed (a
    # 503 in 1,000 reads of the events once, 2026-12-02, at the 2 s default).
    settings = system.settings.model_copy(
        update={"redis_pool_timeout_seconds": 60.0, "redis_timeout_seconds": 60.0}
    )
    # aiohttp's client would queue beyond 100 connections of its own: no limit here.
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        running_gateway(settings) as gateway,
        aiohttp.ClientSession(connector=connector) as session,
    ):

        async def read(path: str) -> int:
            async with session.get(gateway.make_url(path), headers=system.headers) as r:
                await r.read()
                return r.status

        for path in paths:
            statuses = await asyncio.gather(*(read(path) for _ in range(1000)))
            assert Counter(statuses) == {200: 1000}, path


async def test_a_read_that_waits_too_long_for_a_store_connection_is_503_saying_so(
    system: System,
) -> None:
    settings = system.settings.model_copy(
        update={
            "redis_max_connections": 1,
            "redis_pool_timeout_seconds": 0.2,
            "redis_timeout_seconds": 5.0,
        }
    )
    async with running_gateway(settings) as client:
        execution_id = await system.submit("echo")
        # The one connection is taken for a second by a blocking command.
        redis = client.app[APP_REDIS]

        async def hold_the_connection() -> None:
            await redis.blpop([f"test:{uuid.uuid4().hex}:never"], timeout=1)

        hold = asyncio.create_task(hold_the_connection())
        await asyncio.sleep(0.1)
        response = await client.get(f"/api/v1/executions/{execution_id}", headers=system.headers)
        body = await assert_error(response, 503, "STORE_UNAVAILABLE")
        assert "came free within 0.2 s" in body["error"]
        assert response.headers["Retry-After"] == str(settings.retry_after_seconds)
        await hold
        # Free again: the same read answers.
        response = await client.get(f"/api/v1/executions/{execution_id}", headers=system.headers)
        assert response.status == 200


async def test_the_queued_event_is_published_unless_turned_off(system: System) -> None:
    shown = await system.submit("echo", payload="on")
    await system.events.wait_status(shown, ExecutionStatus.COMPLETED)
    # (It may arrive after ``admitted``: they travel on different connections.)
    assert ExecutionStatus.QUEUED in system.events.statuses(shown)
    queued = system.events.first(shown, ExecutionStatus.QUEUED)
    assert queued.submission is not None
    assert queued.submission.payload == "on"
    assert queued.submission.submitted_by == key_id_for(digest_key(system.tenant.api_key))

    settings = system.settings.model_copy(update={"publish_queued_events": False})
    async with running_gateway(settings) as quiet:
        response = await quiet.post(
            "/api/v1/workflows/echo/run", json={"payload": "off"}, headers=system.headers
        )
        assert response.status == 200
        hidden = (await response.json())["execution_id"]
        await system.events.wait_status(hidden, ExecutionStatus.COMPLETED)
        assert ExecutionStatus.QUEUED not in system.events.statuses(hidden)
        # The record exists all the same, from the dispatcher's first event on.
        record = await system.wait_status(hidden, "completed")
        assert record["payload"] == "off"


async def test_events_recorded_out_of_order_end_in_the_right_record(system: System) -> None:
    run = Run(system.project, "echo", payload={"late": True})
    queued = run.event(ExecutionStatus.QUEUED, submission=run.submission())
    admitted, running, completed = run.lifecycle()
    await publish_events(system.amqp, [completed, running, queued, admitted])

    # The recorder may write them in more than one batch: wait for the last
    # one published (the admitted event), then every field must be right.
    deadline = time.monotonic() + 10
    record = await system.wait_status(run.execution_id, "completed")
    while record["admitted_at"] is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        record = await system.get(run.execution_id)
    assert record["result"] == {"done": run.execution_id}
    assert record["payload"] == {"late": True}
    assert record["admitted_at"] == admitted.at
    assert record["started_at"] == running.at
