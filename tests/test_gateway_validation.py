"""Bad input: 400 / 413 / 415 with a JSON error naming the field, and nothing published (G6)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.registry import register_deployment
from gateway.settings import Settings
from schemas.api import INT32_MAX
from schemas.topology import submit_queue
from tests.conftest import (
    Tenant,
    assert_error,
    detail_fields,
    new_tenant,
    queue_depth,
    queue_exists,
    running_gateway,
)

Client = TestClient[web.Request, web.Application]

MAX_RUN_TIMEOUT = 7200
STRING_FIELDS = [
    "deployment_id",
    "queue_name",
    "concurrency_key",
    "session_id",
    "user_id",
    "otel_traceparent",
    "parent_execution_id",
    "root_execution_id",
    "step_key",
]

# (body, the field that ``details`` must name)
INVALID_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({}, "payload"),
    ({"queue_name": "hello"}, "payload"),
    ({"payload": 1, "queue_name": "bad name!"}, "queue_name"),
    ({"payload": 1, "queue_name": "a/b"}, "queue_name"),
    ({"payload": 1, "queue_name": "q" * 129}, "queue_name"),
    ({"payload": 1, "queue_name": ""}, "queue_name"),
    ({"payload": 1, "queue_name": "abc\n"}, "queue_name"),
    ({"payload": 1, "queue_concurrency_limit": 0}, "queue_concurrency_limit"),
    ({"payload": 1, "queue_concurrency_limit": -3}, "queue_concurrency_limit"),
    ({"payload": 1, "queue_concurrency_limit": INT32_MAX + 1}, "queue_concurrency_limit"),
    ({"payload": 1, "queue_concurrency_limit": "5"}, "queue_concurrency_limit"),
    ({"payload": 1, "queue_concurrency_limit": 2.5}, "queue_concurrency_limit"),
    ({"payload": 1, "queue_concurrency_limit": True}, "queue_concurrency_limit"),
    ({"payload": 1, "concurrency_key": "k" * 256}, "concurrency_key"),
    ({"payload": 1, "concurrency_strategy": "partitioned"}, "concurrency_strategy"),
    ({"payload": 1, "concurrency_strategy": ""}, "concurrency_strategy"),
    ({"payload": 1, "concurrency_strategy": "PARTITION"}, "concurrency_strategy"),
    ({"payload": 1, "concurrency_strategy": 1}, "concurrency_strategy"),
    ({"payload": 1, "concurrency_strategy": ["partition"]}, "concurrency_strategy"),
    ({"payload": 1, "run_timeout_seconds": 0}, "run_timeout_seconds"),
    ({"payload": 1, "run_timeout_seconds": -60}, "run_timeout_seconds"),
    ({"payload": 1, "run_timeout_seconds": MAX_RUN_TIMEOUT + 1}, "run_timeout_seconds"),
    ({"payload": 1, "run_timeout_seconds": INT32_MAX + 1}, "run_timeout_seconds"),
    ({"payload": 1, "run_timeout_seconds": "60"}, "run_timeout_seconds"),
    ({"payload": 1, "wait_for_subworkflow": "yes"}, "wait_for_subworkflow"),
    ({"payload": 1, "wait_for_subworkflow": 1}, "wait_for_subworkflow"),
    *[({"payload": 1, field: 123}, field) for field in STRING_FIELDS],
    *[({"payload": 1, field: ["x"]}, field) for field in STRING_FIELDS],
]


def _case_id(case: tuple[dict[str, Any], str]) -> str:
    body, field = case
    value = body.get(field, "<missing>")
    return f"{field}={str(value)[:20]}"


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Client, Tenant, AbstractConnection]]:
    """One gateway for the module: none of these tests changes it."""
    tenant = new_tenant(tmp_path_factory.mktemp("validation") / "projects.json")
    await register_deployment(amqp_url, tenant.project_id, "v1", ["hello", "needs space"])
    settings = Settings(
        amqp_url=amqp_url,
        projects_file=tenant.projects_file,
        max_run_timeout_seconds=MAX_RUN_TIMEOUT,
        max_body_bytes=1024,
    )
    connection = await aio_pika.connect(amqp_url)
    async with running_gateway(settings) as client:
        yield client, tenant, connection
    channel = await connection.channel()
    await channel.queue_delete(submit_queue(tenant.project_id, "hello"))
    await connection.close()


@pytest.fixture
def tenant(shared: tuple[Client, Tenant, AbstractConnection]) -> Tenant:
    return shared[1]


@pytest_asyncio.fixture(loop_scope="module")
async def gateway(shared: tuple[Client, Tenant, AbstractConnection]) -> AsyncIterator[Client]:
    """The shared gateway, and after the test the check that bad input declared no queue."""
    client, tenant, connection = shared
    yield client
    # Only names the broker could hold: the others cannot have been declared.
    for queue in ("hello", "q" * 129):
        name = submit_queue(tenant.project_id, queue)
        assert not await queue_exists(connection, name), f"bad input declared {name}"


@pytest.mark.parametrize(("body", "field"), INVALID_FIELDS, ids=map(_case_id, INVALID_FIELDS))
async def test_invalid_field_is_400_naming_it(
    gateway: Client, tenant: Tenant, body: dict[str, Any], field: str
) -> None:
    response = await gateway.post("/api/v1/workflows/hello/run", json=body, headers=tenant.headers)

    error = await assert_error(response, 400, "VALIDATION_ERROR")
    assert field in detail_fields(error)
    assert field in error["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"",
        b"{'payload': 1}",
        b'{"payload": }',
        b"\xff\xfe",
        # Not JSON, and no JSON value to carry them: never stored as null.
        b'{"payload": NaN}',
        b'{"payload": [Infinity, -Infinity]}',
        b'{"payload": 1e400}',
    ],
)
async def test_malformed_json_is_400(gateway: Client, tenant: Tenant, raw: bytes) -> None:
    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        data=raw,
        headers={**tenant.headers, "Content-Type": "application/json"},
    )

    error = await assert_error(response, 400, "INVALID_JSON")
    assert detail_fields(error) == ["body"]


@pytest.mark.parametrize("raw", [b"[]", b'"payload"', b"1", b"null", b'[{"payload": 1}]'])
async def test_body_not_an_object_is_400(gateway: Client, tenant: Tenant, raw: bytes) -> None:
    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        data=raw,
        headers={**tenant.headers, "Content-Type": "application/json"},
    )

    error = await assert_error(response, 400, "INVALID_REQUEST")
    assert detail_fields(error) == ["body"]


async def test_several_invalid_fields_are_all_named(gateway: Client, tenant: Tenant) -> None:
    body = {"queue_name": "", "queue_concurrency_limit": 0, "run_timeout_seconds": "x"}

    response = await gateway.post("/api/v1/workflows/hello/run", json=body, headers=tenant.headers)

    error = await assert_error(response, 400, "VALIDATION_ERROR")
    assert set(detail_fields(error)) == {
        "payload",
        "queue_name",
        "queue_concurrency_limit",
        "run_timeout_seconds",
    }


async def test_workflow_id_that_is_no_queue_name_needs_an_explicit_queue_name(
    gateway: Client, tenant: Tenant
) -> None:
    response = await gateway.post(
        "/api/v1/workflows/needs%20space/run", json={"payload": 1}, headers=tenant.headers
    )

    error = await assert_error(response, 400, "VALIDATION_ERROR")
    assert detail_fields(error) == ["queue_name"]

    # A valid queue name and a newline is not one.
    response = await gateway.post(
        "/api/v1/workflows/hello%0A/run", json={"payload": 1}, headers=tenant.headers
    )

    error = await assert_error(response, 400, "VALIDATION_ERROR")
    assert detail_fields(error) == ["queue_name"]


async def test_an_empty_deployment_id_is_an_unknown_deployment(
    gateway: Client, tenant: Tenant
) -> None:
    # Not "the latest": a client that names a deployment gets that one or a 404.
    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        json={"payload": 1, "deployment_id": ""},
        headers=tenant.headers,
    )

    await assert_error(response, 404, "DEPLOYMENT_NOT_FOUND")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_wrong_content_type_is_415(
    gateway: Client, tenant: Tenant, content_type: str
) -> None:
    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        data=b'{"payload": 1}',
        headers={**tenant.headers, "Content-Type": content_type},
    )

    await assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE")


async def test_missing_content_type_is_415(gateway: Client, tenant: Tenant) -> None:
    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        data=b'{"payload": 1}',
        headers=tenant.headers,
        skip_auto_headers=["Content-Type"],
    )

    await assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE")


def _body_of_size(size: int, **fields: Any) -> bytes:
    raw = orjson.dumps({**fields, "payload": ""})
    body = orjson.dumps({**fields, "payload": "x" * (size - len(raw))})
    assert len(body) == size
    return body


async def test_body_over_the_limit_is_413(gateway: Client, tenant: Tenant) -> None:
    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        data=_body_of_size(1025),
        headers={**tenant.headers, "Content-Type": "application/json"},
    )

    await assert_error(response, 413, "PAYLOAD_TOO_LARGE")


async def test_chunked_body_over_the_limit_is_413(gateway: Client, tenant: Tenant) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        body = _body_of_size(4096)
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    response = await gateway.post(
        "/api/v1/workflows/hello/run",
        data=chunks(),
        headers={**tenant.headers, "Content-Type": "application/json"},
    )

    await assert_error(response, 413, "PAYLOAD_TOO_LARGE")


async def test_body_at_the_limit_is_accepted(
    shared: tuple[Client, Tenant, AbstractConnection],
) -> None:
    client, tenant, connection = shared
    queue = submit_queue(tenant.project_id, "at-limit")
    try:
        response = await client.post(
            "/api/v1/workflows/hello/run",
            data=_body_of_size(1024, queue_name="at-limit"),
            headers={**tenant.headers, "Content-Type": "application/json"},
        )

        assert response.status == 200, await response.text()
        assert await queue_depth(connection, queue) == 1
    finally:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.close()
