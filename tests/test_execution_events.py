"""``GET /api/v1/executions/{id}/events``: Server-Sent Events from the current state on,
closing after the terminal event; keep-alives while idle; a client that leaves
takes its subscription with it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.auth import create_key, revoke_key
from gateway.context import APP_WATCH
from schemas.dispatch import ExecutionStatus
from tests.conftest import assert_error
from tests.dispatcher_support import until
from tests.execution_support import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="module")

S = ExecutionStatus
KEEPALIVE = 0.2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(
        amqp_url,
        tmp_path_factory.mktemp("events"),
        gateway={"sse_keepalive_seconds": KEEPALIVE, "cancel_wait_seconds": 0.5},
    ) as running:
        yield running


@dataclass
class Stream:
    """What a client read from one event stream."""

    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    comments: int = 0
    closed: bool = False

    @property
    def statuses(self) -> list[str]:
        return [data["status"] for _, _, data in self.events]


async def read_stream(response: aiohttp.ClientResponse, stream: Stream) -> None:
    """Parse ``text/event-stream`` until the server closes it."""
    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if event:
                stream.events.append((event["event"], event["id"], json.loads(event["data"])))
                event = {}
        elif line.startswith(":"):
            stream.comments += 1
        else:
            name, _, value = line.partition(": ")
            event[name] = value
    stream.closed = True


async def open_stream(system: System, execution_id: str) -> aiohttp.ClientResponse:
    response = await system.client.get(
        f"/api/v1/executions/{execution_id}/events", headers=system.headers
    )
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    return response


RANK = {"queued": 0, "admitted": 1, "running": 2}


async def test_a_stream_shows_the_state_then_each_transition_and_closes_after_the_last(
    system: System,
) -> None:
    execution_id = await system.submit("sleep", payload={"seconds": 0.5})
    response = await open_stream(system, execution_id)
    stream = Stream()
    async with asyncio.timeout(10):
        await read_stream(response, stream)

    assert stream.closed
    kind, event_id, first = stream.events[0]
    assert kind == "record"
    assert first["id"] == execution_id
    assert event_id == f"{execution_id}/{first['status']}"
    assert first["status"] in ("queued", "admitted", "running")
    assert [k for k, _, _ in stream.events[1:]] == ["lifecycle"] * (len(stream.events) - 1)
    statuses = stream.statuses
    assert statuses[-1] == "completed"
    assert "running" in statuses, statuses
    ranks = [RANK.get(s, 3) for s in statuses]
    assert ranks == sorted(ranks), statuses
    assert len(set(statuses)) == len(statuses), statuses
    final = stream.events[-1][2]
    assert final["execution_id"] == execution_id
    assert final["result"] == {"slept": 0.5}


async def test_a_finished_execution_streams_its_record_and_closes(system: System) -> None:
    execution_id = await system.submit("echo", payload="x")
    await system.wait_status(execution_id, "completed")
    response = await open_stream(system, execution_id)
    stream = Stream()
    async with asyncio.timeout(5):
        await read_stream(response, stream)
    assert [(k, s["status"]) for k, _, s in stream.events] == [("record", "completed")]
    assert stream.events[0][2]["result"]["echo"] == "x"


async def test_an_idle_stream_gets_keepalives_and_ends_with_a_cancel(system: System) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    holder = await system.submit(
        "sleep", payload={"seconds": 30}, queue_name=queue, queue_concurrency_limit=1
    )
    await system.events.wait_status(holder, S.RUNNING)
    waiting = await system.submit("sleep", payload={"seconds": 0.01}, queue_name=queue)
    await system.wait_status(waiting, "queued")

    response = await open_stream(system, waiting)
    stream = Stream()
    reader = asyncio.create_task(read_stream(response, stream))
    await until(lambda: stream.comments >= 2, timeout=5, what="keep-alive comments")
    assert stream.statuses == ["queued"]

    cancelled = await system.client.post(
        f"/api/v1/executions/{waiting}/cancel", headers=system.headers
    )
    assert cancelled.status == 200
    async with asyncio.timeout(5):
        await reader
    assert stream.statuses == ["queued", "cancelled"]
    assert stream.events[-1][2]["cancelled_by"]
    await system.client.post(f"/api/v1/executions/{holder}/cancel", headers=system.headers)


async def test_a_retried_run_streams_each_failed_run_then_its_end(system: System) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    holder = await system.submit(
        "sleep", payload={"seconds": 0.5}, queue_name=queue, queue_concurrency_limit=1
    )
    await system.events.wait_status(holder, S.RUNNING)
    flaky = await system.submit("flaky", payload=None, queue_name=queue)
    await system.wait_status(flaky, "queued")
    response = await open_stream(system, flaky)
    stream = Stream()
    async with asyncio.timeout(10):
        await read_stream(response, stream)

    assert stream.statuses[-1] == "completed"
    retries = [(i, data) for _, i, data in stream.events if data.get("retry_at")]
    [(event_id, retry)] = retries
    assert event_id == f"{flaky}/retry/0"
    assert (retry["status"], retry["retry_count"]) == ("running", 0)
    assert retry["error"]["message"] == "run 1 lost its link"
    assert stream.events[-1][2]["retry_count"] == 1


async def test_a_client_that_leaves_takes_its_subscription_with_it(system: System) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    holder = await system.submit(
        "sleep", payload={"seconds": 30}, queue_name=queue, queue_concurrency_limit=1
    )
    await system.events.wait_status(holder, S.RUNNING)
    watch = system.client.app[APP_WATCH]
    before = watch.channels

    # Two clients watch the same execution: one Redis channel; it goes with the last.
    first = await open_stream(system, holder)
    second = await open_stream(system, holder)
    await until(lambda: watch.streams == 2, what="two streams")
    assert watch.channels == before + 1
    first.close()
    await until(lambda: watch.streams == 1, timeout=5, what="the first stream to go")
    assert watch.channels == before + 1
    second.close()
    await until(lambda: watch.streams == 0, timeout=5, what="the second stream to go")
    await until(lambda: watch.channels == before, timeout=5, what="the channel to go")
    await system.client.post(f"/api/v1/executions/{holder}/cancel", headers=system.headers)


async def test_stream_errors_come_before_the_stream(system: System) -> None:
    client = system.client
    await assert_error(
        await client.get(f"/api/v1/executions/{uuid.uuid4()}/events", headers=system.headers),
        404,
        "EXECUTION_NOT_FOUND",
    )
    await assert_error(await client.get("/api/v1/executions/x/events", headers=system.headers), 400)
    await assert_error(await client.get(f"/api/v1/executions/{uuid.uuid4()}/events"), 401)
    watch = client.app[APP_WATCH]
    await until(lambda: watch.streams == 0, what="nothing left subscribed")


async def test_revoking_a_key_ends_its_open_streams_and_only_those(system: System) -> None:
    # The gateway's own SIGHUP handler reloads the keys file (as `kill -HUP` does).
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
    # A second key of the project, so the module's own key outlives this test.
    second_key, second_id = create_key(system.tenant.projects_file, system.project)
    os.kill(os.getpid(), signal.SIGHUP)
    holder = await system.submit("sleep", payload={"seconds": 30})
    # The record, not just the event: a stream opened on an older record would also
    # get the `running` event, two events where this test waits for one each.
    await system.wait_status(holder, "running")
    theirs = await system.client.get(
        f"/api/v1/executions/{holder}/events",
        headers={**system.headers, "Authorization": f"Bearer {second_key}"},
    )
    assert theirs.status == 200
    ours = await open_stream(system, holder)
    revoked, kept = Stream(), Stream()
    readers = [
        asyncio.create_task(read_stream(theirs, revoked)),
        asyncio.create_task(read_stream(ours, kept)),
    ]
    await until(
        lambda: len(revoked.events) == len(kept.events) == 1, timeout=15, what="both streams open"
    )

    assert revoke_key(system.tenant.projects_file, second_id)
    os.kill(os.getpid(), signal.SIGHUP)

    async with asyncio.timeout(5):
        await readers[0]
    assert revoked.closed
    await asyncio.sleep(0.3)
    assert not kept.closed
    await system.client.post(f"/api/v1/executions/{holder}/cancel", headers=system.headers)
    async with asyncio.timeout(5):
        await readers[1]
