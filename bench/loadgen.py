"""The HTTP load generator: closed loop for throughput, open loop for honest latency.

It runs in its own processes (``bench.harness``), never in the process under
test, and costs as little CPU per request as Python allows, because on a
2-core machine every cycle it burns is taken from the broker and the gateway.

Two engines speak HTTP/1.1 with keep-alive:

- ``raw`` (default): an ``asyncio.Protocol`` per connection that writes a
  request prepared once as bytes and parses only the status line and
  ``Content-Length`` of the answer. About 20 µs of CPU per request here.
- ``aiohttp``: ``aiohttp.ClientSession``, the reference client; about 4x the
  CPU per request (measured: ~85 µs), which on this machine would take a
  third of a core away from the system under test at 6,000 requests/s.

Closed loop: each connection sends its next request when the previous answer
arrived; the throughput at saturation is what it measures. Its latencies hide
queueing (a slow answer delays the next send: coordinated omission), so
latency targets below saturation are measured open loop: requests are
scheduled at a fixed rate and each latency runs from the *intended* send time,
as wrk2 does, so time spent waiting for a free connection counts.

Every request carries the time it was (meant to be) sent: a body holding
``STAMP`` gets it replaced, per request, by that wall-clock time (the
intended time in open loop), so a worker that runs the submission can tell
how long it took from the client to it. Connection ``i`` sends
``bodies[i % len(bodies)]``: one body per queue spreads load over queues.

``method`` and ``paths`` make other requests: with ``paths`` (e.g. one status
read per existing execution), connection ``i`` cycles through its share of
them (``paths[i::connections]``), each request prepared once as bytes.

``unique_header`` names a header that every request carries with a value no
other request of the run has (an ``Idempotency-Key`` that is never a retry).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from bench.harness import PerfWindow, run_child, ticking, wait_for_window
from bench.stats import WorkerReport

ENGINES = ("raw", "aiohttp")
# Replaced in each request by the wall-clock send time, "%017.6f" (same length).
STAMP = b"0000000000.000000"
# Replaced in each request by a value unique to it (``unique_header``).
KEY_MARK = b"@@unique@@"
# Open loop: how long after the window the backlog may still drain.
_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class HttpTarget:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What every load process does; ``index``/``processes`` say which share is its."""

    targets: tuple[HttpTarget, ...]
    path: str
    headers: tuple[tuple[str, str], ...]
    bodies: tuple[bytes, ...]
    connections: int  # all processes together
    processes: int
    rate: float | None = None  # open loop (requests/s, all processes together) when set
    engine: str = "raw"
    index: int = 0
    method: str = "POST"
    # When set, each connection cycles through its share of these instead of ``path``.
    paths: tuple[str, ...] = ()
    unique_header: str | None = None

    def share(self, index: int) -> LoadSpec:
        return dataclasses.replace(self, index=index)

    def my_connections(self) -> list[tuple[HttpTarget, bytes, tuple[str, ...]]]:
        """Target, body and paths of each connection of this process; connections spread
        evenly (connection ``i`` of all processes together goes to ``targets[i % len]`` with
        ``bodies[i % len]`` and ``paths[i::connections]``, or ``path``)."""
        mine = range(self.index, self.connections, self.processes)
        return [
            (
                self.targets[i % len(self.targets)],
                self.bodies[i % len(self.bodies)],
                self._paths_of(i),
            )
            for i in mine
        ]

    def _paths_of(self, i: int) -> tuple[str, ...]:
        if not self.paths:
            return (self.path,)
        return self.paths[i % len(self.paths) :: self.connections]

    def my_rate(self) -> float:
        assert self.rate is not None
        return self.rate / self.processes


def request_bytes(
    target: HttpTarget, spec: LoadSpec, body: bytes, path: str | None = None
) -> bytes:
    head = [f"{spec.method} {path or spec.path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    head += [f"{name}: {value}" for name, value in spec.headers]
    if spec.unique_header is not None:
        head.append(f"{spec.unique_header}: {KEY_MARK.decode()}")
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def stamp(sent_at: float) -> bytes:
    return b"%017.6f" % sent_at


class _UniqueValues:
    """``<random>-<n>``: the random part tells clients and runs apart."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex().encode()
        self._sent = 0

    def next(self) -> bytes:
        self._sent += 1
        return b"%s-%d" % (self._prefix, self._sent)


def split_stamp(payload: bytes) -> tuple[bytes, bytes] | None:
    """``payload`` around its ``STAMP`` (None if it has none)."""
    at = payload.find(STAMP)
    if at < 0:
        return None
    return payload[:at], payload[at + len(STAMP) :]


class ProtocolError(Exception):
    pass


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 ") or at < 0:
            self._fail(ProtocolError(f"unsupported response head {head[:200]!r}"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
        total = end + 4 + length
        if len(buffer) < total:
            return
        del buffer[:total]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(int(head[9:12]))
        if b"\r\nconnection: close" in head:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection closed by the server: {exc!r}"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def request(self, payload: bytes) -> asyncio.Future[int]:
        assert self._transport is not None
        assert self._waiter is None
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._transport.write(payload)
        return waiter


class _Client:
    """Sends one request at a time on one connection (reconnecting if needed).

    ``sent_at``: the wall-clock time to stamp the request with.
    """

    async def send(self, sent_at: float) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _RawClient(_Client):
    def __init__(
        self, target: HttpTarget, spec: LoadSpec, body: bytes, paths: tuple[str, ...]
    ) -> None:
        self._target = target
        self._payload = request_bytes(target, spec, body, paths[0])
        self._parts = split_stamp(self._payload)
        self._unique = _UniqueValues() if spec.unique_header is not None else None
        # Several paths: cycle through them (no stamp: these are reads).
        self._cycle = (
            itertools.cycle([request_bytes(target, spec, body, p) for p in paths])
            if len(paths) > 1
            else None
        )
        self._conn: _RawConnection | None = None

    async def send(self, sent_at: float) -> int:
        conn = self._conn
        if conn is None or conn.closed:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(
                _RawConnection, self._target.host, self._target.port
            )
            self._conn = conn
        if self._cycle is not None:
            return await conn.request(next(self._cycle))
        parts = self._parts
        payload = self._payload if parts is None else parts[0] + stamp(sent_at) + parts[1]
        if self._unique is not None:
            payload = payload.replace(KEY_MARK, self._unique.next(), 1)
        return await conn.request(payload)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class _AiohttpClient(_Client):
    def __init__(
        self,
        target: HttpTarget,
        spec: LoadSpec,
        body: bytes,
        paths: tuple[str, ...],
        session: object,
    ) -> None:
        import aiohttp

        assert isinstance(session, aiohttp.ClientSession)
        self._session = session
        self._method = spec.method
        self._urls = itertools.cycle([f"http://{target.host}:{target.port}{p}" for p in paths])
        self._headers = dict(spec.headers)
        self._body = body
        self._parts = split_stamp(body)
        self._unique_header = spec.unique_header
        self._unique = _UniqueValues()

    async def send(self, sent_at: float) -> int:
        parts = self._parts
        body = self._body if parts is None else parts[0] + stamp(sent_at) + parts[1]
        url = next(self._urls)
        headers = self._headers
        if self._unique_header is not None:
            headers = {**headers, self._unique_header: self._unique.next().decode()}
        request = self._session.request(self._method, url, data=body, headers=headers)
        async with request as resp:
            await resp.read()
            return resp.status

    async def close(self) -> None:
        pass


async def _closed_loop(clients: list[_Client], window: PerfWindow, report: WorkerReport) -> None:
    async def drive(client: _Client) -> None:
        perf = time.perf_counter
        latencies = report.latencies_ms
        statuses = report.statuses
        start, end, wall = window.start, window.end, window.wall_offset
        while True:
            sent = perf()
            if sent >= end:
                return
            try:
                status = await client.send(sent + wall)
            except (TimeoutError, OSError, ProtocolError) as exc:
                if sent >= start:
                    report.error(exc)
                await asyncio.sleep(0.01)
                continue
            done = perf()
            if start <= done < end:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    report.ok += 1
                    latencies.append((done - sent) * 1000.0)

    await asyncio.gather(*(drive(c) for c in clients))


async def _open_loop(
    clients: list[_Client], rate: float, window: PerfWindow, report: WorkerReport
) -> None:
    """Requests at ``rate``/s from ``window.t0``; latency from each intended send time."""
    perf = time.perf_counter
    interval = 1.0 / rate
    due: asyncio.Queue[float] = asyncio.Queue()

    async def schedule() -> None:
        i = 0
        while True:
            now = perf()
            while True:
                intended = window.t0 + i * interval
                if intended > now or intended >= window.end:
                    break
                due.put_nowait(intended)
                if intended >= window.start:
                    report.scheduled += 1
                    report.lateness_ms.append((now - intended) * 1000.0)
                i += 1
            if intended >= window.end:
                return
            await asyncio.sleep(max(0.0, intended - perf()))

    async def drive(client: _Client) -> None:
        latencies = report.latencies_ms
        statuses = report.statuses
        while True:
            intended = await due.get()
            measured = window.start <= intended < window.end
            try:
                status = await client.send(intended + window.wall_offset)
            except (TimeoutError, OSError, ProtocolError) as exc:
                if measured:
                    report.error(exc)
                continue
            finally:
                due.task_done()
            if measured:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    report.ok += 1
                    latencies.append((perf() - intended) * 1000.0)

    drivers = [asyncio.create_task(drive(c)) for c in clients]
    try:
        await schedule()
        try:
            async with asyncio.timeout(max(0.0, window.end + _GRACE_S - perf())):
                await due.join()
        except TimeoutError:
            pass
    finally:
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
    answered = report.ok + report.errors + sum(n for s, n in report.statuses.items() if s != 200)
    report.unsent = max(0, report.scheduled - answered)


async def _run(spec: LoadSpec, conn: Connection) -> WorkerReport:
    connections = spec.my_connections()
    session = None
    if spec.engine == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        clients: list[_Client] = [_AiohttpClient(t, spec, b, p, session) for t, b, p in connections]
    else:
        clients = [_RawClient(t, spec, b, p) for t, b, p in connections]
    report = WorkerReport()
    try:
        window = await wait_for_window(conn)
        async with ticking(conn, report):
            if spec.rate is None:
                await _closed_loop(clients, window, report)
            else:
                await _open_loop(clients, spec.my_rate(), window, report)
    finally:
        for client in clients:
            await client.close()
        if session is not None:
            await session.close()
    return report


def load_process(spec: LoadSpec, conn: Connection) -> None:
    """Entry point of one load process (``bench.harness.run_processes`` target)."""
    run_child(conn, _run(spec, conn))
