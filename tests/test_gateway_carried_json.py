"""What the gateway answers 200 for, every later layer reads as sent (DESIGN G6).

``payload`` and ``initial_state`` go into the envelope, the work message and
the lifecycle events: nested deeper than those can be read (``schemas.limits``),
or holding an integer orjson cannot write exactly, they are refused with a 400
naming the field, and nothing is published. Unknown fields are not carried, so
nothing in them is refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.registry import register_deployment
from gateway.settings import Settings
from schemas.dispatch import decode_lifecycle, decode_work, encode_queued_event, encode_work
from schemas.envelope import decode_submission
from schemas.limits import MAX_INT, MAX_VALUE_DEPTH, MIN_INT
from schemas.topology import submit_queue
from tests.conftest import (
    Tenant,
    assert_error,
    detail_fields,
    new_tenant,
    queue_exists,
    running_gateway,
    take_messages,
)
from tests.test_json_limits import nested

Client = TestClient[web.Request, web.Application]
RUN = "/api/v1/workflows/hello/run"
BATCH = "/api/v1/workflows/batch_run"

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Gateway:
    def __init__(self, client: Client, tenant: Tenant, connection: AbstractConnection) -> None:
        self.client, self.tenant, self.connection = client, tenant, connection
        self.queues: list[str] = []

    def queue(self) -> str:
        name = f"json-{uuid.uuid4().hex[:12]}"
        self.queues.append(name)
        return name

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        # The standard library writes integers of any size, as a client may; DEEP
        # stands for a value nested deeper than it writes.
        return await self.client.post(
            path,
            data=json.dumps(body).replace(f'"{DEEP}"', _nested_text(1000)),
            headers={**self.tenant.headers, "Content-Type": "application/json"},
        )

    async def refused(self, path: str, body: dict[str, Any], queue: str) -> list[str]:
        """The fields a 400 names; the queue was never declared (nothing published)."""
        response = await self.post(path, body)
        error = await assert_error(response, 400, "VALIDATION_ERROR")
        assert not await queue_exists(self.connection, submit_queue(self.tenant.project_id, queue))
        return detail_fields(error)

    async def published(self, path: str, body: dict[str, Any], queue: str, count: int) -> list[Any]:
        """200; each envelope as every later layer reads it, and as sent (exact JSON)."""
        response = await self.post(path, body)
        assert response.status == 200, await response.text()
        messages = await take_messages(
            self.connection, submit_queue(self.tenant.project_id, queue), count
        )
        envelopes = []
        for message in messages:
            raw = message.body
            submission = decode_submission(raw)
            decode_work(
                encode_work(dispatch_id="d", deadline=1, results_queue="r", submission_raw=raw)
            )
            decode_lifecycle(
                encode_queued_event(
                    execution_id=submission.execution_id,
                    created_at=submission.created_at,
                    project_id=submission.project_id,
                    workflow_id=submission.workflow_id,
                    deployment_id=submission.deployment_id,
                    queue_name=submission.queue_name,
                    concurrency_key=None,
                    submission_raw=raw,
                )
            )
            envelopes.append(json.loads(raw))
        return envelopes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    tenant = new_tenant(tmp_path_factory.mktemp("carried") / "projects.json")
    await register_deployment(amqp_url, tenant.project_id, "v1", ["hello"])
    settings = Settings(amqp_url=amqp_url, projects_file=tenant.projects_file)
    connection = await aio_pika.connect(amqp_url)
    async with running_gateway(settings) as client:
        gateway = Gateway(client, tenant, connection)
        yield gateway
    channel = await connection.channel()
    for queue in gateway.queues:
        await channel.queue_delete(submit_queue(tenant.project_id, queue))
    await connection.close()


TOO_DEEP = [MAX_VALUE_DEPTH + 1, 253, 300]
DEEP = "@nested-1000-deep@"


def _nested_text(depth: int) -> str:
    return (
        '{"k": ' * (depth // 2)
        + "[" * (depth - depth // 2)
        + "1"
        + "]" * (depth - depth // 2)
        + "}" * (depth // 2)
    )


def _deep(depth: int) -> Any:
    return DEEP if depth == 1000 else nested(depth)


@pytest.mark.parametrize("field", ["payload", "initial_state"])
@pytest.mark.parametrize("depth", [*TOO_DEEP, 1000])
async def test_a_value_nested_deeper_than_every_layer_reads_is_400_naming_it(
    gateway: Gateway, field: str, depth: int
) -> None:
    queue = gateway.queue()
    body = {"payload": None, field: _deep(depth), "queue_name": queue}
    assert await gateway.refused(RUN, body, queue) == [field]


@pytest.mark.parametrize("field", ["payload", "initial_state"])
@pytest.mark.parametrize("depth", TOO_DEEP[:2])
async def test_a_batch_item_nested_too_deep_is_400_naming_it(
    gateway: Gateway, field: str, depth: int
) -> None:
    queue = gateway.queue()
    item = {"workflow_id": "hello", "payload": 1, "queue_name": queue}
    body = {"workflows": [item, {**item, field: nested(depth)}]}
    assert await gateway.refused(BATCH, body, queue) == [f"workflows.1.{field}"]


async def test_values_at_the_budget_are_accepted_and_read_by_every_layer(
    gateway: Gateway,
) -> None:
    queue = gateway.queue()
    value = nested(MAX_VALUE_DEPTH)
    body = {"payload": value, "initial_state": value, "queue_name": queue}
    [envelope] = await gateway.published(RUN, body, queue, 1)
    assert envelope["payload"] == value
    assert envelope["initial_state"] == value

    item = {"workflow_id": "hello", "payload": value, "initial_state": value, "queue_name": queue}
    envelopes = await gateway.published(BATCH, {"workflows": [item, item]}, queue, 2)
    assert [e["payload"] for e in envelopes] == [value, value]


async def test_a_deep_unknown_field_is_ignored(gateway: Gateway) -> None:
    queue = gateway.queue()
    body = {"payload": 1, "queue_name": queue, "channel_context": DEEP, "n": 10**30}
    [envelope] = await gateway.published(RUN, body, queue, 1)
    assert envelope["payload"] == 1


WIDE = [MAX_INT + 1, MIN_INT - 1, 10**30, -(10**40)]


@pytest.mark.parametrize("field", ["payload", "initial_state"])
@pytest.mark.parametrize("wide", WIDE)
async def test_an_integer_beyond_64_bits_is_400_naming_its_field(
    gateway: Gateway, field: str, wide: int
) -> None:
    queue = gateway.queue()
    body = {"payload": None, field: {"a": [1, {"b": wide}]}, "queue_name": queue}
    assert await gateway.refused(RUN, body, queue) == [field]


@pytest.mark.parametrize("field", ["payload", "initial_state"])
async def test_a_batch_item_with_an_integer_beyond_64_bits_is_400_naming_it(
    gateway: Gateway, field: str
) -> None:
    queue = gateway.queue()
    item = {"workflow_id": "hello", "payload": 1, "queue_name": queue}
    body = {"workflows": [item, item, {**item, field: [MAX_INT + 1]}]}
    assert await gateway.refused(BATCH, body, queue) == [f"workflows.2.{field}"]


@pytest.mark.parametrize(
    "field", ["queue_concurrency_limit", "run_timeout_seconds", "wait_for_subworkflow"]
)
async def test_an_integer_beyond_64_bits_in_a_typed_field_is_400(
    gateway: Gateway, field: str
) -> None:
    queue = gateway.queue()
    body = {"payload": 1, field: MAX_INT + 1, "queue_name": queue}
    assert await gateway.refused(RUN, body, queue) == [field]


async def test_integers_at_the_edges_of_64_bits_and_long_digit_strings_stay_exact(
    gateway: Gateway,
) -> None:
    queue = gateway.queue()
    value = {
        "ints": [MAX_INT, MIN_INT, 2**63, 9_999_999_999_999_999_999],
        "floats": [1e20, 1.8446744073709552e19, -9.3e18],
        "strings": ["123456789012345678901234567890", str(MAX_INT + 1)],
    }
    body = {"payload": value, "initial_state": value, "queue_name": queue}
    [envelope] = await gateway.published(RUN, body, queue, 1)
    assert envelope["payload"] == value
    assert envelope["initial_state"] == value


@pytest.mark.parametrize(
    "raw",
    [
        # A lone surrogate: orjson and pydantic both refuse it in any string.
        b'{"payload": "\\ud800"}',
        b'{"payload": {"k": "\\udc00"}}',
        b'{"payload": 1, "session_id": "\\ud83d"}',
        # Not UTF-8, and UTF-8-encoded surrogates.
        b'{"payload": "\xff"}',
        b'{"payload": 1, "user_id": "\xed\xa0\x80"}',
    ],
)
async def test_strings_a_later_layer_could_not_read_are_400(gateway: Gateway, raw: bytes) -> None:
    response = await gateway.client.post(
        RUN, data=raw, headers={**gateway.tenant.headers, "Content-Type": "application/json"}
    )
    await assert_error(response, 400, "INVALID_JSON")
