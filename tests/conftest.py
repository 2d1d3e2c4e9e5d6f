"""Fixtures: a real RabbitMQ, unique names per test, cleanup registered by each fixture.

The broker is the one on 127.0.0.1 (or ``POLOS_AMQP_URL``); where neither
answers and a Docker engine exists, a testcontainers RabbitMQ. With none of
them the run stops at once with a clear message: nothing is skipped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from broker.registry import register_deployment
from gateway.app import create_app
from gateway.auth import create_key
from gateway.context import APP_LINK
from gateway.settings import Settings
from store import ExecutionStore
from tests.proxy import TcpProxy, running_proxy
from tests.store_support import RecorderFactory, recorders, redis_client

if TYPE_CHECKING:
    from tests.worker_harness import RunWorker

# The worker tests' fixtures (the dispatcher's part, in-process workers). Imported as a
# plugin, not here: pytest rewrites the asserts of a plugin only if it imports it first.
pytest_plugins = ("tests.worker_harness",)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def _broker_answers(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception:
        return False
    await connection.close()
    return True


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _session_vhost(url: str) -> tuple[str, Callable[[], None] | None]:
    """A virtual host of this test session's own, on a local broker we can administer.

    Everything a session declares (queues, the registry stream) lives and dies
    with it: runs never see each other's state, the registry a gateway replays
    holds only this session's events, and nothing is left behind. Set
    POLOS_TEST_VHOST=shared to use the URL's vhost as it is.
    """
    parsed = URL(url)
    local = parsed.host in ("127.0.0.1", "localhost", "::1")
    if (
        os.environ.get("POLOS_TEST_VHOST") == "shared"
        or not local
        or not shutil.which("rabbitmqctl")
    ):
        return url, None
    vhost = f"polos-test-{uuid.uuid4().hex[:12]}"
    user = parsed.user or "guest"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except (subprocess.SubprocessError, OSError):
        return url, None  # not ours to administer: share the URL's vhost

    def delete() -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _rabbitmqctl("delete_vhost", vhost)

    return str(parsed.with_path("/" + vhost)), delete


def _find_broker() -> tuple[str, Any]:
    url = os.environ.get("POLOS_AMQP_URL", DEFAULT_AMQP_URL)
    if asyncio.run(_broker_answers(url)):
        return url, None
    if shutil.which("docker") and os.path.exists("/var/run/docker.sock"):
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
        container.start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        return f"amqp://guest:guest@{host}:{port}/", container
    pytest.exit(
        f"No RabbitMQ answers at {url} and no Docker engine is available. Start one "
        "(`rabbitmq-server -detached`) or set POLOS_AMQP_URL. Tests never skip for this.",
        returncode=3,
    )


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url, container = _find_broker()
    url, delete_vhost = _session_vhost(url)
    yield url
    if delete_vhost is not None:
        delete_vhost()
    if container is not None:
        container.stop()


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A short unique id for names this test creates."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def amqp(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[AbstractConnection]:
    """A plain connection named after the test, for inspecting the broker."""
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": f"test-{request.node.name}"[:200]}
    )
    yield connection
    await connection.close()


@pytest.fixture
async def delete_queues(amqp: AbstractConnection) -> AsyncIterator[Callable[[str], None]]:
    """Register a queue name to delete when the test ends."""
    names: list[str] = []
    yield names.append
    channel = await amqp.channel()
    for name in names:
        try:
            await channel.queue_delete(name)
        except aio_pika.exceptions.ChannelClosed:
            channel = await amqp.channel()
    await channel.close()


class Tenant:
    """A project with an API key in a projects file of the test's own."""

    def __init__(self, projects_file: Path, project_id: str, api_key: str) -> None:
        self.projects_file = projects_file
        self.project_id = project_id
        self.api_key = api_key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "X-Project-ID": self.project_id}


@pytest.fixture
def tenant(tmp_path: Path, uid: str) -> Tenant:
    projects_file = tmp_path / "projects.json"
    key, _ = create_key(projects_file, uid)
    return Tenant(projects_file, uid, key)


@pytest.fixture
def register(amqp_url: str) -> Callable[[str, str, list[str]], Awaitable[None]]:
    async def _register(project_id: str, deployment_id: str, workflows: list[str]) -> None:
        await register_deployment(amqp_url, project_id, deployment_id, workflows)

    return _register


@pytest.fixture
def gateway_settings(amqp_url: str, tenant: Tenant) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        projects_file=tenant.projects_file,
        confirm_timeout_seconds=3.0,
    )


GatewayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_gateway(aiohttp_client: Any, gateway_settings: Settings) -> GatewayFactory:
    """Start a gateway app (settings overridable) and wait until it is ready."""

    async def _make(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = gateway_settings.model_copy(update=overrides)
        app = create_app(settings)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        async with asyncio.timeout(15):
            await app[APP_LINK].wait_ready()
        return client

    return _make


async def take_messages(
    connection: AbstractConnection, queue_name: str, count: int, *, timeout: float = 10.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Consume (and ack) exactly ``count`` messages; fail if fewer arrive in time.

    Submission queues are single-active-consumer quorum queues, which refuse
    ``basic.get``, so tests read them as a consumer does.
    """
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=min(count, 1000) or 1)
    queue = await channel.declare_queue(queue_name, passive=True)
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    done = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        got.append(message)
        if len(got) >= count:
            done.set()

    tag = await queue.consume(on_message)
    try:
        async with asyncio.timeout(timeout):
            await done.wait()
    except TimeoutError:
        raise AssertionError(f"{queue_name}: {len(got)} of {count} messages") from None
    finally:
        await queue.cancel(tag)
        await channel.close()
    return got


async def queue_depth(connection: AbstractConnection, queue_name: str) -> int:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def has_depth(connection: AbstractConnection, queue_name: str, depth: int) -> bool:
    return await queue_depth(connection, queue_name) == depth


# -- broker loss, subprocess gateways (gateway tests) ------------------------------


@pytest.fixture
async def broker_proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy to the broker that the test can cut, hold and restore."""
    url = URL(amqp_url)
    async with running_proxy(url.host or "127.0.0.1", url.port or 5672) as proxy:
        yield proxy


ERROR_TYPE_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


async def assert_error(
    response: ClientResponse, status: int, error_type: str | None = None
) -> dict[str, Any]:
    """The response is ``status`` with the one error shape: {error, error_type, details}."""
    text = await response.text()
    assert response.status == status, f"expected {status}, got {response.status}: {text}"
    assert response.content_type == "application/json", response.content_type
    body: dict[str, Any] = json.loads(text)
    assert set(body) == {"error", "error_type", "details"}, body
    assert isinstance(body["error"], str), body
    assert body["error"], body
    assert ERROR_TYPE_RE.match(body["error_type"]), body
    if error_type is not None:
        assert body["error_type"] == error_type, body
    assert isinstance(body["details"], list), body
    for detail in body["details"]:
        assert set(detail) == {"field", "message"}, detail
        assert isinstance(detail["field"], str), detail
        assert isinstance(detail["message"], str), detail
    return body


def detail_fields(body: dict[str, Any]) -> list[str]:
    return [detail["field"] for detail in body["details"]]


def openapi_refs(node: Any) -> list[str]:
    """Every ``$ref`` in an OpenAPI document (or a part of it), in document order."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in openapi_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in openapi_refs(value)]
    return []


def resolve_ref(document: dict[str, Any], ref: str) -> Any:
    """What a local ``$ref`` (``#/components/...``) of ``document`` points at."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


async def queue_exists(connection: AbstractConnection, queue_name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue_name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return False
    await channel.close()
    return True


# -- dispatcher tests (helpers in tests/dispatcher_support.py) -----------------------

from dispatcher import Dispatcher  # noqa: E402
from dispatcher import Settings as DispatcherSettings  # noqa: E402
from tests.dispatcher_support import EventLog, Probe, QueueKit, probe_worker  # noqa: E402


@pytest.fixture
async def queue_kit(amqp: AbstractConnection, uid: str) -> AsyncIterator[QueueKit]:
    """Submission queues of the test's project (``uid``), deleted at the end."""
    kit = QueueKit(amqp, uid)
    await kit.open()
    yield kit
    await kit.close()


@pytest.fixture
async def event_log(amqp: AbstractConnection, uid: str) -> AsyncIterator[EventLog]:
    """Lifecycle events of the test's project, bound before anything is published."""
    log = EventLog(amqp, uid)
    await log.open()
    yield log
    await log.close()


ProbeFactory = Callable[..., Awaitable[Probe]]


@pytest.fixture
def start_probe(amqp_url: str, uid: str, run_worker: RunWorker) -> ProbeFactory:
    """``await start_probe(concurrency=32)``: a started in-process SDK worker of the test's
    project running ``sleep``, seen through the ``Probe`` returned; stopped at the end."""

    async def _start(*, concurrency: int = 32) -> Probe:
        probe = Probe()
        await run_worker(probe_worker(amqp_url, uid, probe, concurrency=concurrency))
        return probe

    return _start


DispatcherFactory = Callable[..., Awaitable[Dispatcher]]


@pytest.fixture
async def make_dispatcher(amqp_url: str, uid: str) -> AsyncIterator[DispatcherFactory]:
    """Start an in-process dispatcher owning ``<uid>/*`` (settings overridable)."""
    started: list[Dispatcher] = []

    async def _make(**overrides: Any) -> Dispatcher:
        fields: dict[str, Any] = {"amqp_url": amqp_url, "dispatcher_queues": f"{uid}/*"}
        settings = DispatcherSettings(**{**fields, **overrides})
        dispatcher = Dispatcher(settings)
        started.append(dispatcher)
        await dispatcher.start()
        return dispatcher

    yield _make
    for dispatcher in started:
        await dispatcher.stop(drain=False)


@asynccontextmanager
async def running_gateway(
    settings: Settings, *, wait_ready: bool = True
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A gateway app on a real port, for fixtures wider than one test.

    Every start replays the whole registry stream, so a module whose tests only
    need *a* gateway shares one.
    """
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        if wait_ready:
            async with asyncio.timeout(15):
                await app[APP_LINK].wait_ready()
        yield client


def new_tenant(projects_file: Path, project_id: str | None = None) -> Tenant:
    """A project with a fresh key, in ``projects_file``."""
    project_id = project_id or f"t{uuid.uuid4().hex[:10]}"
    key, _ = create_key(projects_file, project_id)
    return Tenant(projects_file, project_id, key)


REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


class GatewayProcess:
    """``python -m gateway`` run as a user runs it, on a port of its own."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait_ready(self, *, within: float = 20.0) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(within):
            while True:
                if self.process.returncode is not None:
                    raise AssertionError(f"gateway exited early:\n{self.log()}")
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{self.url}/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def wait_exit(self, *, within: float) -> int:
        async with asyncio.timeout(within):
            return await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await self.wait_exit(within=15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


GatewayProcessFactory = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def gateway_process(amqp_url: str, tmp_path: Path) -> AsyncIterator[GatewayProcessFactory]:
    """Start ``python -m gateway`` (env overridable), wait until /ready; stopped at the end."""
    started: list[GatewayProcess] = []

    async def _start(projects_file: Path, **env: str) -> GatewayProcess:
        port = free_port()
        environ = {
            **os.environ,
            "POLOS_HOST": "127.0.0.1",
            "POLOS_PORT": str(port),
            "POLOS_PROJECTS_FILE": str(projects_file),
            "POLOS_AMQP_URL": amqp_url,
            **env,
        }
        log_path = tmp_path / f"gateway-{port}.log"
        with _log_file(log_path) as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                env=environ,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        gateway = GatewayProcess(process, port, log_path)
        started.append(gateway)
        await gateway.wait_ready()
        return gateway

    yield _start
    for gateway in started:
        await gateway.stop()


# -- the execution store and recorders (Redis) ---------------------------------------


@pytest.fixture
async def redis(uid: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client whose keys (``test:<uid>:``) are deleted when the test ends."""
    async with redis_client(f"test:{uid}:") as client:
        yield client


@pytest.fixture
def store(redis: aioredis.Redis, uid: str) -> ExecutionStore:
    """Reads what the recorders of this test wrote (modules may override the retention)."""
    return ExecutionStore(redis, 3600, key_prefix=f"test:{uid}:")


@pytest.fixture
async def make_recorder(
    amqp_url: str, uid: str, delete_queues: Callable[[str], None]
) -> AsyncIterator[RecorderFactory]:
    """Start recorders of this test (its own queue and key prefix); stopped at the end."""
    async with recorders(amqp_url, uid, delete_queues) as make:
        yield make


# -- RabbitMQ nodes of a test's own (tests/broker_nodes.py) --------------------------

from tests.broker_node_sets import NodeSet  # noqa: E402
from tests.broker_nodes import RabbitNode  # noqa: E402

NodeFactory = Callable[..., RabbitNode]
ClusterFactory = Callable[..., list[RabbitNode]]


@pytest.fixture
def rabbit_node() -> Iterator[NodeFactory]:
    """``rabbit_node(consumer_timeout_ms=60000)``: a private node, serving; removed at the end."""
    with NodeSet() as nodes:
        yield nodes.node


@pytest.fixture
def rabbit_cluster() -> Iterator[ClusterFactory]:
    """``rabbit_cluster(3)``: private nodes forming one cluster; removed at the end."""
    with NodeSet() as nodes:
        yield nodes.cluster


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts; killed at the end if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
