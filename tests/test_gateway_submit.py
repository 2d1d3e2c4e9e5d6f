"""Accepted submissions: confirmed before the 200, stamped, defaulted, each exactly once (G1)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.registry import register_deployment
from gateway.auth import digest_key, key_id_for
from gateway.settings import Settings
from schemas.envelope import SubmissionEnvelope, decode_submission
from schemas.ids import uuid7_time_ms
from schemas.topology import submit_queue, submit_queue_arguments
from tests.conftest import (
    Tenant,
    assert_error,
    detail_fields,
    new_tenant,
    openapi_refs,
    queue_depth,
    resolve_ref,
    running_gateway,
    take_messages,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

Client = TestClient[web.Request, web.Application]
RUN = "/api/v1/workflows/hello/run"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
QUEUES = ["hello", "full", "payloads", "ordered", "many", "sdk", "small", "timeouts", "deleted"]


@dataclass
class World:
    client: Client
    amqp: AbstractConnection
    tenant: Tenant
    settings: Settings

    def queue(self, queue_name: str) -> str:
        return submit_queue(self.tenant.project_id, queue_name)

    async def submit(self, body: dict[str, Any], workflow: str = "hello") -> dict[str, Any]:
        response = await self.client.post(
            f"/api/v1/workflows/{workflow}/run", json=body, headers=self.tenant.headers
        )
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result

    async def take(self, queue_name: str, count: int = 1) -> list[SubmissionEnvelope]:
        messages = await take_messages(self.amqp, self.queue(queue_name), count)
        return [decode_submission(message.body) for message in messages]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tenant = new_tenant(tmp_path_factory.mktemp("submit") / "projects.json")
    await register_deployment(amqp_url, tenant.project_id, "v1", ["hello"])
    connection = await aio_pika.connect(amqp_url)
    settings = Settings(amqp_url=amqp_url, projects_file=tenant.projects_file)
    async with running_gateway(settings) as client:
        yield World(client, connection, tenant, settings)
    channel = await connection.channel()
    for queue in QUEUES:
        await channel.queue_delete(submit_queue(tenant.project_id, queue))
    await connection.close()


async def test_200_comes_after_the_broker_stored_the_message_with_every_field(
    world: World,
) -> None:
    body = {
        "payload": {"text": "hi", "items": [1, 2.5, None, True], "nested": {"a": "é"}},
        "deployment_id": "v1",
        "queue_name": "full",
        "queue_concurrency_limit": 4,
        "concurrency_strategy": "partition",
        "concurrency_key": "customer-42",
        "run_timeout_seconds": 120,
        "initial_state": {"step": 0},
        "session_id": "session-1",
        "user_id": "user-1",
        "otel_traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "parent_execution_id": "parent-1",
        "root_execution_id": "root-1",
        "step_key": "step-1",
        "wait_for_subworkflow": True,
    }

    answer = await world.submit(body)

    # Confirmed before the answer: the message is in the queue the moment it arrives.
    assert await queue_depth(world.amqp, world.queue("full")) == 1
    assert set(answer) == {"execution_id", "created_at"}
    execution_id = uuid.UUID(answer["execution_id"])
    assert execution_id.version == 7
    assert execution_id.variant == uuid.RFC_4122
    assert RFC3339_UTC.match(answer["created_at"])
    created = datetime.strptime(answer["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(created.timestamp() * 1000 - uuid7_time_ms(execution_id)) <= 1

    [message] = await take_messages(world.amqp, world.queue("full"), 1)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == answer["execution_id"]
    assert message.content_type == "application/json"
    envelope = decode_submission(message.body)
    # The registry event that recorded its limit and strategy (its dispatcher waits
    # for it: tests/test_dispatcher_config_wait.py).
    assert re.fullmatch("[0-9a-f]{32}", envelope.queue_config_id or "")
    assert envelope.model_dump() == {
        "type": "submission",
        "schema_version": 1,
        "execution_id": answer["execution_id"],
        "created_at": answer["created_at"],
        "project_id": world.tenant.project_id,
        "workflow_id": "hello",
        "deployment_id": "v1",
        "queue_name": "full",
        "queue_concurrency_limit": 4,
        "concurrency_strategy": "partition",
        "concurrency_key": "customer-42",
        "queue_config_id": envelope.queue_config_id,
        "run_timeout_seconds": 120,
        "payload": body["payload"],
        "initial_state": {"step": 0},
        "session_id": "session-1",
        "user_id": "user-1",
        "otel_traceparent": body["otel_traceparent"],
        "parent_execution_id": "parent-1",
        "root_execution_id": "root-1",
        "step_key": "step-1",
        "wait_for_subworkflow": True,
        "submitted_by": key_id_for(digest_key(world.tenant.api_key)),
    }
    # A durable quorum queue: redeclaring it with exactly those arguments is accepted.
    channel = await world.amqp.channel()
    arguments = submit_queue_arguments(max_length=world.settings.queue_max_length)
    await channel.declare_queue(world.queue("full"), durable=True, arguments=arguments)
    await channel.close()


async def test_defaults_queue_timeout_and_session(world: World) -> None:
    first = await world.submit({"payload": {"n": 1}})
    second = await world.submit({"payload": {"n": 2}, "session_id": None, "queue_name": None})

    envelopes = await world.take("hello", 2)
    assert [e.execution_id for e in envelopes] == [first["execution_id"], second["execution_id"]]
    for envelope in envelopes:
        assert envelope.queue_name == "hello"  # the workflow id
        assert envelope.run_timeout_seconds == 3600
        assert envelope.deployment_id == "v1"
        assert envelope.queue_concurrency_limit is None
        assert envelope.concurrency_key is None
        assert envelope.wait_for_subworkflow is False
        uuid.UUID(envelope.session_id)  # generated, as Polos does
    assert envelopes[0].session_id != envelopes[1].session_id


async def test_pass_through_fields_of_any_length_and_an_empty_key(world: World) -> None:
    long = {
        "session_id": "s" * 1000,
        "user_id": "u" * 1000,
        "otel_traceparent": "t" * 1000,
        "parent_execution_id": "p" * 1000,
        "root_execution_id": "r" * 1000,
        "step_key": "k" * 1000,
    }
    await world.submit({"payload": 1, "queue_name": "payloads", "concurrency_key": "", **long})

    [envelope] = await world.take("payloads")
    assert {name: getattr(envelope, name) for name in long} == long  # carried unchanged
    assert envelope.concurrency_key is None  # "" is no key: never deduplicated


async def test_unknown_fields_are_ignored(world: World) -> None:
    body = {
        "payload": {"n": 1},
        "queue_name": "payloads",
        "batch_id": "batch-1",
        "channel_context": {"channel": "slack", "thread": "t1"},
        "something_new": [1, 2, 3],
    }

    answer = await world.submit(body)

    [message] = await take_messages(world.amqp, world.queue("payloads"), 1)
    raw = orjson.loads(message.body)
    assert raw["execution_id"] == answer["execution_id"]
    assert not {"batch_id", "channel_context", "something_new"} & set(raw)


async def test_any_json_payload_is_carried_unchanged_null_included(world: World) -> None:
    payloads: list[Any] = [None, [], "text", 0, -1.5, True, {"deep": {"list": [{"x": None}]}}]
    for payload in payloads:
        await world.submit({"payload": payload, "queue_name": "payloads"})

    envelopes = await world.take("payloads", len(payloads))
    assert [e.payload for e in envelopes] == payloads


async def test_integers_up_to_64_bits_are_exact_and_beyond_are_refused_never_a_500(
    world: World,
) -> None:
    # Beyond 64 bits orjson would read a float (inexact) and cannot write one:
    # refused (tests/test_gateway_carried_json.py has every field and the batch).
    raw = b'{"payload": 18446744073709551615, "queue_name": "payloads"}'
    headers = {**world.tenant.headers, "Content-Type": "application/json"}
    response = await world.client.post(RUN, data=raw, headers=headers)
    assert response.status == 200, await response.text()
    [envelope] = await world.take("payloads")
    assert envelope.payload == 2**64 - 1

    raw = b'{"payload": 123456789012345678901234567890, "queue_name": "payloads"}'
    response = await world.client.post(RUN, data=raw, headers=headers)
    error = await assert_error(response, 400, "VALIDATION_ERROR")
    assert detail_fields(error) == ["payload"]


async def test_execution_ids_are_uuid7_in_submission_order(world: World) -> None:
    answers = [await world.submit({"payload": i, "queue_name": "ordered"}) for i in range(30)]

    ids = [uuid.UUID(answer["execution_id"]) for answer in answers]
    assert all(execution_id.version == 7 for execution_id in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    created = [answer["created_at"] for answer in answers]
    assert created == sorted(created)
    await world.take("ordered", len(answers))


async def test_many_concurrent_submissions_land_exactly_once(world: World) -> None:
    total, connections = 500, 50
    url = str(world.client.make_url(RUN))
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def submit(i: int) -> str:
            body = {"payload": {"i": i}, "queue_name": "many"}
            async with session.post(url, json=body, headers=world.tenant.headers) as response:
                assert response.status == 200, await response.text()
                execution_id: str = (await response.json())["execution_id"]
                return execution_id

        answered = await asyncio.gather(*(submit(i) for i in range(total)))

    assert len(set(answered)) == total
    assert await queue_depth(world.amqp, world.queue("many")) == total
    messages = await take_messages(world.amqp, world.queue("many"), total)
    envelopes = [decode_submission(m.body) for m in messages]
    assert sorted(m.message_id or "" for m in messages) == sorted(answered)
    assert sorted(e.execution_id for e in envelopes) == sorted(answered)
    assert sorted(e.payload["i"] for e in envelopes) == list(range(total))


async def test_polos_sdk_client_invoke_is_accepted(world: World) -> None:
    from polos.runtime.client import PolosClient

    client = PolosClient(
        api_url=str(world.client.make_url("")).rstrip("/"),
        api_key=world.tenant.api_key,
        project_id=world.tenant.project_id,
    )

    handle = await client.invoke(
        "hello",
        payload={"name": "world"},
        queue_name="sdk",
        queue_concurrency_limit=2,
        concurrency_key="k1",
        session_id="s1",
        user_id="u1",
        initial_state={"count": 0},
        run_timeout_seconds=60,
    )

    [envelope] = await world.take("sdk")
    assert handle.id == envelope.execution_id
    assert uuid.UUID(handle.id).version == 7
    assert envelope.workflow_id == "hello"
    assert envelope.deployment_id == "v1"
    assert envelope.payload == {"name": "world"}
    assert envelope.queue_concurrency_limit == 2
    assert envelope.concurrency_key == "k1"
    assert (envelope.session_id, envelope.user_id) == ("s1", "u1")
    assert envelope.initial_state == {"count": 0}
    assert envelope.run_timeout_seconds == 60


async def test_full_queue_is_429_and_nothing_is_dropped(world: World) -> None:
    settings = world.settings.model_copy(update={"queue_max_length": 2})
    async with running_gateway(settings) as small:
        statuses = []
        for i in range(5):
            response = await small.post(
                RUN, json={"payload": i, "queue_name": "small"}, headers=world.tenant.headers
            )
            statuses.append(response.status)
            if response.status != 200:
                error = await assert_error(response, 429, "QUEUE_FULL")
                assert "small" in error["error"]
                assert response.headers["Retry-After"] == "1"
        accepted = statuses.count(200)
        # Quorum queues refuse publishes once they are *over* x-max-length, so
        # the broker may take one more than the maximum (RabbitMQ 3.10 does).
        assert accepted in (2, 3), statuses
        assert statuses == [200] * accepted + [429] * (5 - accepted)
        # The broker kept exactly what it accepted; the refused ones are not there.
        assert await queue_depth(world.amqp, world.queue("small")) == accepted
        envelopes = await world.take("small", accepted)
        assert [e.payload for e in envelopes] == list(range(accepted))
        # Room again: accepted again.
        response = await small.post(
            RUN, json={"payload": 9, "queue_name": "small"}, headers=world.tenant.headers
        )
        assert response.status == 200


async def test_default_run_timeout_is_configurable(world: World) -> None:
    settings = world.settings.model_copy(update={"default_run_timeout_seconds": 90})
    async with running_gateway(settings) as configured:
        response = await configured.post(
            RUN, json={"payload": 1, "queue_name": "timeouts"}, headers=world.tenant.headers
        )
        assert response.status == 200

    [envelope] = await world.take("timeouts")
    assert envelope.run_timeout_seconds == 90


async def test_health_and_ready(world: World) -> None:
    health = await world.client.get("/health")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    ready = await world.client.get("/ready")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready"}


async def test_openapi_describes_the_submit_operation(world: World) -> None:
    response = await world.client.get("/openapi.json")

    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert document["info"]["title"]
    assert document["info"]["version"]
    for ref in openapi_refs(document):
        assert resolve_ref(document, ref) is not None, ref
    operation = document["paths"]["/api/v1/workflows/{workflow_id}/run"]["post"]
    assert operation["operationId"] == "submit_workflow"
    assert {p["name"] for p in operation["parameters"]} == {
        "workflow_id",
        "X-Project-ID",
        "Idempotency-Key",
    }
    for status in ("200", "400", "401", "403", "404", "409", "413", "415", "422", "429", "503"):
        assert status in operation["responses"], status
    request_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = resolve_ref(document, request_ref)
    # Every field of the Polos SubmitWorkflowRequest, payload required, and our extension.
    assert set(request["properties"]) == {
        "concurrency_strategy",
        "payload",
        "deployment_id",
        "queue_name",
        "queue_concurrency_limit",
        "concurrency_key",
        "run_timeout_seconds",
        "initial_state",
        "session_id",
        "user_id",
        "otel_traceparent",
        "parent_execution_id",
        "root_execution_id",
        "step_key",
        "wait_for_subworkflow",
    }
    assert request["required"] == ["payload"]
    ok_ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert set(resolve_ref(document, ok_ref)["required"]) == {"execution_id", "created_at"}
    assert {"bearer_auth", "cookie_auth"} <= set(document["components"]["securitySchemes"])


async def test_a_queue_deleted_behind_the_gateways_back_is_declared_again(world: World) -> None:
    await world.submit({"payload": 1, "queue_name": "deleted"})
    channel = await world.amqp.channel()
    await channel.queue_delete(world.queue("deleted"))
    await channel.close()

    answer = await world.submit({"payload": 2, "queue_name": "deleted"})

    [envelope] = await world.take("deleted")
    assert (envelope.execution_id, envelope.payload) == (answer["execution_id"], 2)
