"""``GET /api/v1/events/stream``: the real ``polos-sdk`` streams a run's events (Polos's path
and event shape), resumes by sequence id, and stops when the run is over."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from schemas.dispatch import ExecutionStatus
from tests.conftest import assert_error, running_gateway
from tests.execution_support import System, running_system, sdk_client

pytestmark = pytest.mark.asyncio(loop_scope="module")

STREAM = "/api/v1/events/stream"
LIFECYCLE = ["workflow_queued", "workflow_admitted", "workflow_start"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(amqp_url, tmp_path_factory.mktemp("stream")) as running:
        running.queues.update({"echo", "sleep", "fail"})
        yield running


async def sdk_stream(system: System, workflow: str, run_id: str, **cursor: Any) -> list[Any]:
    """Every event ``stream_workflow`` yields, until it stops by itself."""
    from polos.features.events import stream_workflow

    async with asyncio.timeout(15):
        return [e async for e in stream_workflow(sdk_client(system), workflow, run_id, **cursor)]


async def raw_stream(system: System, **params: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The SSE ``id`` lines and the decoded ``data`` of a stream read to its end."""
    headers = dict(system.headers)
    if "last_event_id" in params:
        headers["Last-Event-ID"] = params.pop("last_event_id")
    ids: list[str] = []
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        response = await system.client.get(STREAM, params=params, headers=headers)
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                ids.append(line[4:])
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return ids, events


async def test_the_sdk_streams_a_run_from_its_start_to_its_finish(system: System) -> None:
    run_id = await system.submit("sleep", payload={"seconds": 0.5})

    events = await sdk_stream(system, "sleep", run_id, last_sequence_id=0)

    assert [e.event_type for e in events] == [*LIFECYCLE, "workflow_finish"]
    assert [e.sequence_id for e in events] == [1, 2, 3, 4]
    assert {e.topic for e in events} == {f"workflow/sleep/{run_id}"}
    assert len({e.id for e in events}) == 4
    for event in events:
        uuid.UUID(event.id)
        assert event.data["_metadata"] == {"execution_id": run_id, "workflow_id": "sleep"}
    start, finish = events[2], events[3]
    assert start.data["payload"] == {"seconds": 0.5}
    assert finish.data["result"] == {"slept": 0.5}
    record = await system.get(run_id)
    assert [e.created_at for e in events] == [
        record["created_at"],
        record["admitted_at"],
        record["started_at"],
        record["completed_at"],
    ]


async def test_the_sdk_resumes_after_the_last_event_it_saw(system: System) -> None:
    run_id = await system.submit("echo", payload="again")
    await system.wait_status(run_id, "completed")

    events = await sdk_stream(system, "echo", run_id, last_sequence_id=2)

    assert [(e.sequence_id, e.event_type) for e in events] == [
        (3, "workflow_start"),
        (4, "workflow_finish"),
    ]


async def test_the_sdks_default_cursor_now_sends_only_what_comes_next(system: System) -> None:
    done = await system.submit("echo", payload="before")
    await system.wait_status(done, "completed")
    running = await system.submit("sleep", payload={"seconds": 1})
    await system.events.wait_status(running, ExecutionStatus.RUNNING)

    # No cursor: the SDK sends last_timestamp=now. A run over before it: no events, and
    # the stream ends (Polos would keep it open).
    assert await sdk_stream(system, "echo", done) == []
    events = await sdk_stream(system, "sleep", running)

    assert [e.event_type for e in events] == ["workflow_finish"]


async def test_a_run_that_fails_ends_its_stream_with_the_error(system: System) -> None:
    run_id = await system.submit("fail", payload=7)

    events = await sdk_stream(system, "fail", run_id, last_sequence_id=0)

    assert [e.event_type for e in events] == [*LIFECYCLE, "workflow_failed"]
    error = events[-1].data["error"]
    assert (error["type"], error["message"]) == ("ValueError", "cannot handle 7")


async def test_the_sdk_can_name_the_runs_topic_instead(system: System) -> None:
    from polos.features.events import stream_topic

    run_id = await system.submit("echo", payload="topic")
    await system.wait_status(run_id, "completed")

    async with asyncio.timeout(15):
        events = [
            e
            async for e in stream_topic(
                sdk_client(system), f"workflow/echo/{run_id}", last_sequence_id=3
            )
        ]

    assert [e.event_type for e in events] == ["workflow_finish"]


async def test_every_gateway_sends_the_same_events(system: System) -> None:
    run_id = await system.submit("echo", payload="same")
    await system.wait_status(run_id, "completed")
    params = {"workflow_id": "echo", "workflow_run_id": run_id}

    ids, first = await raw_stream(system, **params)
    async with running_gateway(system.settings) as other:
        response = await other.get(STREAM, params=params, headers=system.headers)
        text = await response.text()
    second = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]

    assert ids == ["1", "2", "3", "4"]
    assert first == second
    assert [e["sequence_id"] for e in first] == [1, 2, 3, 4]


async def test_last_event_id_resumes_a_browser_event_source(system: System) -> None:
    run_id = await system.submit("echo", payload="browser")
    await system.wait_status(run_id, "completed")

    ids, events = await raw_stream(
        system, workflow_id="echo", workflow_run_id=run_id, last_event_id="3"
    )

    assert ids == ["4"]
    assert events[0]["event_type"] == "workflow_finish"


async def test_a_cursor_in_time_keeps_what_happened_after_it(system: System) -> None:
    run_id = await system.submit("echo", payload="time")
    record = await system.wait_status(run_id, "completed")

    _, events = await raw_stream(
        system,
        workflow_id="echo",
        workflow_run_id=run_id,
        last_timestamp=record["admitted_at"],
    )

    assert [e["event_type"] for e in events] == ["workflow_start", "workflow_finish"]


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({}, ["workflow_run_id"]),
        ({"workflow_run_id": "not-a-uuid", "workflow_id": "echo"}, ["workflow_run_id"]),
        ({"workflow_run_id": str(uuid.uuid4())}, ["workflow_id"]),
        ({"topic": "approvals/123"}, ["topic"]),
        (
            {"workflow_id": "echo", "workflow_run_id": str(uuid.uuid4()), "last_sequence_id": "-1"},
            ["last_sequence_id"],
        ),
        (
            {"workflow_id": "echo", "workflow_run_id": str(uuid.uuid4()), "last_timestamp": "x"},
            ["last_timestamp"],
        ),
    ],
)
async def test_a_bad_query_is_a_400_naming_it(
    system: System, params: dict[str, str], fields: list[str]
) -> None:
    response = await system.client.get(STREAM, params=params, headers=system.headers)

    body = await assert_error(response, 400, "VALIDATION_ERROR")
    assert [d["field"] for d in body["details"]] == fields


async def test_an_unknown_run_or_another_workflows_is_a_404(system: System) -> None:
    run_id = await system.submit("echo", payload="mine")
    await system.wait_status(run_id, "completed")

    for params in (
        {"workflow_id": "echo", "workflow_run_id": str(uuid.uuid4())},
        {"workflow_id": "sleep", "workflow_run_id": run_id},
    ):
        response = await system.client.get(STREAM, params=params, headers=system.headers)
        await assert_error(response, 404, "EXECUTION_NOT_FOUND")


async def test_the_project_may_come_in_the_query(system: System) -> None:
    run_id = await system.submit("echo", payload="query")
    await system.wait_status(run_id, "completed")
    headers = {"Authorization": system.headers["Authorization"]}
    params = {"workflow_id": "echo", "workflow_run_id": run_id, "project_id": system.project}

    response = await system.client.get(STREAM, params=params, headers=headers)

    assert response.status == 200
    assert (await response.text()).count("data: ") == 4
