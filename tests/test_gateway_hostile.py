"""Hostile HTTP (issue 9, items 7-9): compressed bodies, heads and bodies that never
end, too many connections, and the answers aiohttp gives before any handler runs.

The gateway runs as ``python -m gateway`` serves it (``gateway.server.serving``) on a
real port; requests are written byte by byte where a client library would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractConnection
from aiohttp.test_utils import TestServer

from broker.registry import register_deployment
from gateway.app import create_app
from gateway.context import APP_LINK
from gateway.server import SINGLE_HEADERS, GatewaySite, serving
from gateway.settings import Settings
from schemas.topology import submit_queue
from tests.conftest import ERROR_TYPE_RE, Tenant, new_tenant, queue_exists

pytestmark = pytest.mark.asyncio(loop_scope="module")

RUN = "/api/v1/workflows/hello/run"
TIMEOUT = 0.5  # header and body timeouts of the gateway under test


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def error(self) -> dict[str, Any]:
        """The one error shape, as JSON, or fail."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.raw
        body: dict[str, Any] = json.loads(self.body)
        assert set(body) == {"error", "error_type", "details"}, body
        assert body["error"], body
        assert ERROR_TYPE_RE.match(body["error_type"]), body
        assert isinstance(body["details"], list), body
        return body


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, headers, body, raw)


async def read_all(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything until the gateway closes the connection (or fail after ``within``)."""
    got = b""
    async with asyncio.timeout(within):
        # A write of ours the closed connection refused ends the reading too.
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                got += chunk
    return got


@dataclass
class Gateway:
    site: GatewaySite
    tenant: Tenant
    amqp: AbstractConnection
    settings: Settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.site.port}"

    def auth(self) -> bytes:
        return b"".join(f"{k}: {v}\r\n".encode() for k, v in self.tenant.headers.items())

    async def exchange(self, raw: bytes, *, within: float = 3.0) -> Answer:
        """Write ``raw`` and read until the gateway closes the connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.site.port)
        try:
            writer.write(raw)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return parse(await read_all(reader, within))
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[GatewaySite]:
    app = create_app(settings)
    async with serving(app, settings, host="127.0.0.1", port=0) as site:
        async with asyncio.timeout(15):
            await app[APP_LINK].wait_ready()
        yield site


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    tenant = new_tenant(tmp_path_factory.mktemp("hostile") / "projects.json")
    await register_deployment(amqp_url, tenant.project_id, "v1", ["hello"])
    connection = await aio_pika.connect(amqp_url)
    settings = Settings(
        amqp_url=amqp_url,
        projects_file=tenant.projects_file,
        header_timeout_seconds=TIMEOUT,
        body_timeout_seconds=TIMEOUT,
    )
    async with running(settings) as site:
        yield Gateway(site, tenant, connection, settings)
    channel = await connection.channel()
    await channel.queue_delete(submit_queue(tenant.project_id, "hello"))
    await connection.close()


# -- 7: compressed bodies ------------------------------------------------------------------


def _gzip_bomb() -> bytes:
    """About 50 KB of gzip inflating to 50 MB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    return b"".join(compressor.compress(block) for _ in range(50)) + compressor.flush()


ENCODINGS = [
    ("gzip", gzip.compress(b'{"payload": 1}')),
    ("deflate", zlib.compress(b'{"payload": 1}')),
    ("gzip", gzip.compress(b'{"payload": 1}')[:-8] + b"\xff" * 8),  # corrupt
    ("gzip", _gzip_bomb()),
    ("br", b"\x0b\x02\x80"),
    ("foo", b'{"payload": 1}'),  # an unknown coding is not plain text either
    ("gzip, identity", gzip.compress(b'{"payload": 1}')),
]


async def test_a_compressed_body_is_refused_415_on_every_route_that_reads_one(
    gateway: Gateway,
) -> None:
    batch = "/api/v1/workflows/batch_run"
    async with aiohttp.ClientSession(gateway.url, headers=gateway.tenant.headers) as session:
        for path in (RUN, batch):
            for encoding, body in ENCODINGS:
                headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
                async with session.post(path, data=body, headers=headers) as response:
                    text = await response.text()
                    assert response.status == 415, (path, encoding, text)
                    assert json.loads(text)["error_type"] == "UNSUPPORTED_CONTENT_ENCODING"
                    assert encoding not in text
        assert not await queue_exists(
            gateway.amqp, submit_queue(gateway.tenant.project_id, "hello")
        )

        # identity is no coding at all.
        headers = {"Content-Type": "application/json", "Content-Encoding": "identity"}
        async with session.post(RUN, data=b'{"payload": 1}', headers=headers) as response:
            assert response.status == 200, await response.text()


@pytest.mark.parametrize("path", [RUN, "/api/v1/workflows/batch_run"])
@pytest.mark.parametrize(("coding", "status"), [("gzip, chunked", 415), ("chunked", 200)])
async def test_a_transfer_coding_other_than_chunked_is_refused_415(
    gateway: Gateway, path: str, coding: str, status: int
) -> None:
    # aiohttp frames "gzip, chunked" as chunked and would hand on the gzip bytes.
    body = (
        b'{"payload": 1}'
        if path == RUN
        else b'{"workflows": [{"workflow_id": "hello", "payload": 1}]}'
    )
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + gateway.auth()
        + f"Transfer-Encoding: {coding}\r\nConnection: close\r\n\r\n".encode()
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )

    answer = await gateway.exchange(raw)

    assert answer.status == status, answer.raw
    if status == 415:
        assert answer.error()["error_type"] == "UNSUPPORTED_CONTENT_ENCODING"


async def test_a_body_left_unread_is_not_taken_for_the_next_head(gateway: Gateway) -> None:
    # Beyond what aiohttp buffers before it pauses reading: most of it is read (and
    # dropped) after the 415, and the next request on the connection follows it.
    body = os.urandom(1_500_000)
    refused = (
        f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + gateway.auth()
        + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    following = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    raw = (await gateway.exchange(refused + following, within=5.0)).raw

    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"415", b"200"], raw[-500:]


@pytest.mark.parametrize("name", SINGLE_HEADERS)
async def test_a_header_that_decides_who_asks_or_what_is_meant_is_refused_twice(
    gateway: Gateway, name: str
) -> None:
    # Either copy alone is a valid request; which one would count is the ambiguity.
    copies = {
        "Authorization": [f"Bearer {gateway.tenant.api_key}"] * 2,
        "Cookie": [f"polos_auth={gateway.tenant.api_key}"] * 2,
        "X-Project-ID": [gateway.tenant.project_id] * 2,
        "Idempotency-Key": ["first-key", "second-key"],
    }[name]
    auth = {k: v for k, v in gateway.tenant.headers.items() if k != name}
    if name == "Cookie":
        auth.pop("Authorization")
    head = "".join(f"{k}: {v}\r\n" for k, v in auth.items())
    head += "".join(f"{name}: {value}\r\n" for value in copies)
    body = b'{"payload": 1}'
    raw = (
        f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    answer = await gateway.exchange(raw)

    assert answer.status == 400
    error = answer.error()
    assert error["error_type"] == "BAD_HTTP_REQUEST"
    assert error["details"] == [{"field": name, "message": "sent more than once"}]
    assert gateway.tenant.api_key.encode() not in answer.raw


async def test_a_query_parameter_given_twice_is_refused(gateway: Gateway) -> None:
    path = "/api/v1/workflows/hello/runs?limit=1&status=queued&limit=2"
    async with (
        aiohttp.ClientSession(gateway.url, headers=gateway.tenant.headers) as session,
        session.get(path) as response,
    ):
        assert response.status == 400
        error = await response.json()
    assert error["error_type"] == "VALIDATION_ERROR"
    assert error["details"] == [{"field": "limit", "message": "given more than once"}]


@pytest.mark.parametrize("path", [RUN, "/no/such/route"])
async def test_an_expectation_other_than_100_continue_is_refused_in_json(
    gateway: Gateway, path: str
) -> None:
    # aiohttp answers it before any middleware, in text quoting the header.
    body = b'{"payload": 1}'
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + gateway.auth()
        + b"Expect: secret-token-1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )

    answer = await gateway.exchange(raw)

    assert answer.status == 417
    assert answer.error()["error_type"] == "EXPECTATION_FAILED"
    assert b"secret-token-1" not in answer.raw


async def test_expect_100_continue_is_honoured(gateway: Gateway) -> None:
    headers = {**gateway.tenant.headers, "Expect": "100-continue"}
    async with (
        aiohttp.ClientSession(gateway.url) as session,
        session.post(RUN, json={"payload": 1}, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        assert "execution_id" in await response.json()


# -- 8: heads and bodies that never end; connections ----------------------------------------


async def test_a_head_that_trickles_in_is_answered_408_and_closed(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.site.port)
    reading = asyncio.create_task(read_all(reader, 3.0))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    started = asyncio.get_running_loop().time()
    with contextlib.suppress(ConnectionError):
        while not reading.done():  # one header line every 0.1 s, never the last one
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
    answer = parse(await reading)
    writer.close()

    assert answer.status == 408
    assert answer.error()["error_type"] == "REQUEST_TIMEOUT"
    assert asyncio.get_running_loop().time() - started < TIMEOUT + 1.5


async def test_an_unfinished_head_over_max_header_bytes_is_refused_at_once(
    gateway: Gateway,
) -> None:
    # Each field within aiohttp's per-field limit; together over POLOS_MAX_HEADER_BYTES.
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(10))

    answer = await gateway.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields, within=1.0)

    assert answer.status == 431
    assert answer.error()["error_type"] == "HEADERS_TOO_LARGE"


@pytest.mark.parametrize(("size", "status"), [(-10, 200), (10, 431)])
async def test_max_header_bytes_is_exact_however_the_head_is_split(
    gateway: Gateway, size: int, status: int
) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    field = b"X-Pad: " + b"a" * 4000 + b"\r\n"
    while len(head) + len(field) < gateway.settings.max_header_bytes:
        head += field
    last = gateway.settings.max_header_bytes + size - len(head) - len(b"X-End: \r\n\r\n")
    head += b"X-End: " + b"a" * last + b"\r\n\r\n"
    assert len(head) == gateway.settings.max_header_bytes + size
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.site.port)
    reading = asyncio.create_task(read_all(reader, 3.0))
    with contextlib.suppress(ConnectionError):
        for at in range(0, len(head), 4093):  # the end of the head split across reads
            writer.write(head[at : at + 4093])
            await writer.drain()
            await asyncio.sleep(0.01)
    answer = parse(await reading)
    writer.close()

    assert answer.status == status


def head_of(size: int, *, field_bytes: int) -> bytes:
    """A GET /health head of exactly ``size`` bytes, its blank line included."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    field = b"X-Pad: " + b"a" * (field_bytes // 2) + b"\r\n"  # each line within its bound
    while size - len(head) > 2 * len(field):
        head += field
    head += b"X-End: " + b"a" * (size - len(head) - len(b"X-End: \r\n\r\n")) + b"\r\n\r\n"
    assert len(head) == size
    return head


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


@pytest.mark.parametrize(("over", "status"), [(0, 200), (1, 431)])
async def test_max_header_bytes_is_exact_for_a_pipelined_request(
    gateway: Gateway, over: int, status: int
) -> None:
    # The second head arrives while the first request is handled: the middleware's
    # count, not the connection's, decides it, and both count the same bytes.
    first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    limits = gateway.settings
    second = head_of(limits.max_header_bytes + over, field_bytes=limits.max_header_line_bytes)

    answer = await gateway.exchange(first + second)

    assert statuses(answer.raw) == [200, status]


@pytest.mark.parametrize(("over", "status"), [(0, 200), (1, 431)])
async def test_max_header_bytes_is_exact_under_aiohttps_own_runner(
    gateway: Gateway, over: int, status: int
) -> None:
    limits = gateway.settings
    head = head_of(limits.max_header_bytes + over, field_bytes=limits.max_header_line_bytes)
    app = create_app(limits)
    async with TestServer(app, host="127.0.0.1") as server:  # aiohttp's runner, not ours
        await app[APP_LINK].wait_ready()
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(head)
            answer = parse(await read_all(reader, 3.0))
        finally:
            writer.close()

    assert answer.status == status
    if status == 431:
        assert answer.error()["error_type"] == "HEADERS_TOO_LARGE"


async def test_a_whole_head_over_max_header_bytes_is_refused(gateway: Gateway) -> None:
    fields = {f"X-Pad-{i}": "a" * 4000 for i in range(10)}
    async with (
        aiohttp.ClientSession(gateway.url) as session,
        session.get("/health", headers=fields) as response,
    ):
        assert response.status == 431
        assert (await response.json())["error_type"] == "HEADERS_TOO_LARGE"


async def test_a_body_that_stalls_is_answered_408_and_its_connection_closed(
    gateway: Gateway,
) -> None:
    head = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    raw = head.encode() + gateway.auth() + b"Content-Length: 100\r\n\r\n" + b'{"payload": '

    started = asyncio.get_running_loop().time()
    answer = await gateway.exchange(raw, within=TIMEOUT + 2.0)

    # Answered and closed right after the timeout, not after aiohttp's 10 s lingering read.
    assert asyncio.get_running_loop().time() - started < TIMEOUT + 1.5
    assert answer.status == 408
    assert answer.error()["error_type"] == "REQUEST_TIMEOUT"


async def test_at_the_connection_limit_the_longest_waiting_connection_makes_room(
    gateway: Gateway,
) -> None:
    settings = gateway.settings.model_copy(update={"max_connections": 3})
    async with running(settings) as site:
        idle = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert site.doorman.open == 3

        # A fourth client is served: the oldest idle connection is closed for it.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{site.port}/health") as response,
        ):
            assert response.status == 200
        oldest_reader, _ = idle[0]
        async with asyncio.timeout(1):
            assert await oldest_reader.read() == b""
        for _, writer in idle:
            writer.close()


async def test_at_the_limit_with_every_connection_busy_a_new_one_is_answered_503(
    gateway: Gateway,
) -> None:
    settings = gateway.settings.model_copy(
        update={"max_connections": 2, "body_timeout_seconds": 5.0}
    )
    head = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    busy_request = head.encode() + gateway.auth() + b"Content-Length: 100\r\n\r\n{"
    async with running(settings) as site:
        busy = []
        for _ in range(2):  # their bodies are still arriving: requests in progress
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(busy_request)
            busy.append(writer)
        await asyncio.sleep(0.2)

        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = parse(await read_all(reader, 2.0))
        writer.close()
        for other in busy:
            other.close()

    assert answer.status == 503
    assert answer.error()["error_type"] == "TOO_MANY_CONNECTIONS"
    assert answer.headers["retry-after"] == str(settings.retry_after_seconds)


# -- 9: aiohttp's own refusals are ours: JSON, never repeating what they refused ---------------


def _refused_requests(key: str) -> list[tuple[str, bytes, int, str]]:
    secret = f"Authorization: Bearer {key}\r\n".encode()
    return [
        (
            "a header field over the line limit, holding the key",
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + secret.rstrip() + b"a" * 9000 + b"\r\n\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
        (
            "more fields than the count limit, the key among them",
            b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + secret
            + b"".join(b"X-F%d: 1\r\n" % i for i in range(80))
            + b"\r\n",
            431,
            "HEADERS_TOO_LARGE",
        ),
        (
            "a request line over the line limit",
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n" + secret + b"\r\n",
            414,
            "URI_TOO_LONG",
        ),
        (
            "a control character in the key's header",
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + secret.rstrip() + b"\x01\r\n\r\n",
            400,
            "BAD_HTTP_REQUEST",
        ),
        (
            "a transfer coding that is not chunked",
            b"POST /health HTTP/1.1\r\nHost: x\r\n" + secret + b"Transfer-Encoding: gzip\r\n\r\n",
            400,
            "BAD_HTTP_REQUEST",
        ),
        (
            "a malformed request line",
            b"GET\x00 / HTTP/1.1\r\nHost: x\r\n" + secret + b"\r\n",
            400,
            "BAD_HTTP_REQUEST",
        ),
        (
            "a bad chunk size in the head's first chunk",
            f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + secret
            + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            400,
            "BAD_HTTP_REQUEST",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_refused_requests("k"))))
async def test_what_aiohttp_refuses_is_answered_as_json_without_echoing_it(
    gateway: Gateway, case: int
) -> None:
    what, raw, status, error_type = _refused_requests(gateway.tenant.api_key)[case]

    answer = await gateway.exchange(raw)

    assert answer.status == status, (what, answer.raw)
    assert answer.error()["error_type"] == error_type, what
    assert gateway.tenant.api_key.encode() not in answer.raw, what
    assert b"aaaa" not in answer.raw, what


async def test_a_body_whose_chunking_breaks_half_way_is_a_json_400(gateway: Gateway) -> None:
    head = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.site.port)
    writer.write(head.encode() + gateway.auth() + b"Transfer-Encoding: chunked\r\n\r\n")
    writer.write(b'4\r\n{"pa\r\n')
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler is reading the body now
    writer.write(b'zz\r\nyload": 1}\r\n0\r\n\r\n')
    answer = parse(await read_all(reader, 3.0))
    writer.close()

    assert answer.status == 400, answer.raw
    assert answer.error()["error_type"] == "BAD_HTTP_REQUEST"


async def test_401_names_the_bearer_scheme(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession(gateway.url) as session,
        session.post(RUN, json={"payload": 1}, headers={"X-Project-ID": "p"}) as response,
    ):
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error_type"] == "UNAUTHORIZED"


async def test_an_unknown_project_is_not_repeated_back(gateway: Gateway) -> None:
    headers = {**gateway.tenant.headers, "X-Project-ID": "polos_looks-like-a-key"}
    async with (
        aiohttp.ClientSession(gateway.url) as session,
        session.post(RUN, json={"payload": 1}, headers=headers) as response,
    ):
        text = await response.text()
    assert response.status == 404
    assert json.loads(text)["error_type"] == "PROJECT_NOT_FOUND"
    assert "looks-like-a-key" not in text
