"""Who may submit where: 401 / 403 / 404 with the JSON error shape, and nothing published (G6)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.registry import register_deployment
from gateway.settings import Settings
from schemas.envelope import decode_submission
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

pytestmark = pytest.mark.asyncio(loop_scope="module")

Client = TestClient[web.Request, web.Application]
RUN = "/api/v1/workflows/hello/run"
BODY = {"payload": {"n": 1}}


@dataclass
class World:
    client: Client
    amqp: AbstractConnection
    a: Tenant  # deployment v1 with "hello"
    b: Tenant  # deployment v1 with "hello"
    empty: Tenant  # no deployment registered


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    projects_file = tmp_path_factory.mktemp("auth") / "projects.json"
    a, b, empty = (new_tenant(projects_file) for _ in range(3))
    for tenant in (a, b):
        await register_deployment(amqp_url, tenant.project_id, "v1", ["hello"])
    connection = await aio_pika.connect(amqp_url)
    settings = Settings(amqp_url=amqp_url, projects_file=projects_file)
    async with running_gateway(settings) as client:
        yield World(client, connection, a, b, empty)
    channel = await connection.channel()
    for tenant in (a, b, empty):
        for queue in ("hello", "cookie", "case"):
            await channel.queue_delete(submit_queue(tenant.project_id, queue))
    await connection.close()


@pytest_asyncio.fixture(loop_scope="module")
async def gateway(world: World) -> AsyncIterator[Client]:
    """The shared gateway; after the test, no tenant's default queue was declared."""
    yield world.client
    for tenant in (world.a, world.b, world.empty):
        name = submit_queue(tenant.project_id, "hello")
        assert not await queue_exists(world.amqp, name), f"a refused request declared {name}"


async def test_missing_key_is_401(gateway: Client, world: World) -> None:
    response = await gateway.post(RUN, json=BODY, headers={"X-Project-ID": world.a.project_id})

    await assert_error(response, 401, "UNAUTHORIZED")


async def test_wrong_key_is_401(gateway: Client, world: World) -> None:
    headers = {"Authorization": "Bearer polos_not-a-key", "X-Project-ID": world.a.project_id}

    response = await gateway.post(RUN, json=BODY, headers=headers)

    await assert_error(response, 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token {key}", "{key}", "Bearer{key}"],
)
async def test_malformed_authorization_is_401(
    gateway: Client, world: World, authorization: str
) -> None:
    headers = {
        "Authorization": authorization.format(key=world.a.api_key),
        "X-Project-ID": world.a.project_id,
    }

    response = await gateway.post(RUN, json=BODY, headers=headers)

    await assert_error(response, 401, "UNAUTHORIZED")


async def test_wrong_cookie_is_401(gateway: Client, world: World) -> None:
    response = await gateway.post(
        RUN,
        json=BODY,
        headers={"X-Project-ID": world.a.project_id, "Cookie": "polos_auth=polos_not-a-key"},
    )

    await assert_error(response, 401, "UNAUTHORIZED")


async def test_key_of_another_project_is_403(gateway: Client, world: World) -> None:
    headers = {"Authorization": f"Bearer {world.b.api_key}", "X-Project-ID": world.a.project_id}

    response = await gateway.post(RUN, json=BODY, headers=headers)

    await assert_error(response, 403, "FORBIDDEN")


async def test_cookie_of_another_project_is_403(gateway: Client, world: World) -> None:
    headers = {"Cookie": f"polos_auth={world.b.api_key}", "X-Project-ID": world.a.project_id}

    response = await gateway.post(RUN, json=BODY, headers=headers)

    await assert_error(response, 403, "FORBIDDEN")


async def test_unknown_project_is_404(gateway: Client, world: World) -> None:
    headers = {"Authorization": f"Bearer {world.a.api_key}", "X-Project-ID": "no-such-project"}

    response = await gateway.post(RUN, json=BODY, headers=headers)

    await assert_error(response, 404, "PROJECT_NOT_FOUND")


async def test_missing_project_header_is_400(gateway: Client, world: World) -> None:
    headers = {"Authorization": f"Bearer {world.a.api_key}"}

    response = await gateway.post(RUN, json=BODY, headers=headers)

    error = await assert_error(response, 400, "MISSING_PROJECT_ID")
    assert detail_fields(error) == ["X-Project-ID"]


async def test_unknown_deployment_is_404(gateway: Client, world: World) -> None:
    body = {**BODY, "deployment_id": "no-such-deployment"}

    response = await gateway.post(RUN, json=body, headers=world.a.headers)

    error = await assert_error(response, 404, "DEPLOYMENT_NOT_FOUND")
    assert "no-such-deployment" in error["error"]


async def test_project_without_any_deployment_is_404(gateway: Client, world: World) -> None:
    response = await gateway.post(RUN, json=BODY, headers=world.empty.headers)

    await assert_error(response, 404, "DEPLOYMENT_NOT_FOUND")


async def test_workflow_not_in_the_deployment_is_404(gateway: Client, world: World) -> None:
    response = await gateway.post(
        "/api/v1/workflows/not-registered/run", json=BODY, headers=world.a.headers
    )

    error = await assert_error(response, 404, "WORKFLOW_NOT_FOUND")
    assert "not-registered" in error["error"]


async def test_another_projects_deployment_is_not_found(gateway: Client, world: World) -> None:
    # Both projects have a "v1": a deployment id never reaches across projects.
    response = await gateway.post(
        RUN, json={**BODY, "deployment_id": "v1"}, headers=world.empty.headers
    )

    await assert_error(response, 404, "DEPLOYMENT_NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/route", 404),
        ("POST", "/api/v1/workflows/hello/start", 404),
        ("POST", "/api/v1/workflows/hello/run/", 404),
        ("GET", RUN, 405),
        ("DELETE", RUN, 405),
    ],
)
async def test_unknown_route_or_method_answers_json(
    gateway: Client, world: World, method: str, path: str, status: int
) -> None:
    response = await gateway.request(method, path, json=BODY, headers=world.a.headers)

    await assert_error(response, status)
    if status == 405:
        assert response.headers["Allow"] == "POST"


async def test_cookie_authenticates(world: World) -> None:
    headers = {"Cookie": f"polos_auth={world.a.api_key}", "X-Project-ID": world.a.project_id}

    response = await world.client.post(RUN, json={**BODY, "queue_name": "cookie"}, headers=headers)

    assert response.status == 200, await response.text()
    [message] = await take_messages(world.amqp, submit_queue(world.a.project_id, "cookie"), 1)
    envelope = decode_submission(message.body)
    assert envelope.execution_id == (await response.json())["execution_id"]
    assert envelope.project_id == world.a.project_id


async def test_header_names_scheme_and_media_type_are_case_insensitive(world: World) -> None:
    headers = {
        "authorization": f"bearer {world.b.api_key}",
        "x-project-id": world.b.project_id,
        "content-type": "Application/JSON; charset=UTF-8",
    }

    response = await world.client.post(
        RUN, data=b'{"payload": 1, "queue_name": "case"}', headers=headers
    )

    assert response.status == 200, await response.text()
    [message] = await take_messages(world.amqp, submit_queue(world.b.project_id, "case"), 1)
    assert decode_submission(message.body).project_id == world.b.project_id
