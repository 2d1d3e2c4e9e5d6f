"""``python -m bench.hostile``: the gateway under hostile clients (issue 9, items 7-8).

One gateway process (``python -m gateway``, as a user runs it; ``--tree`` runs
another checkout's, for before/after figures) and a normal client that reads an
execution's status (authenticated, Redis, a 404) over one keep-alive
connection, 50 times a second. After a quiet baseline, an attacker process
opens ``--connections`` connections that each send ``--header-kib`` KiB of
headers without ever ending them, ``--trickles`` whose head comes a line a
second, and ``--slow-bodies`` authenticated submissions whose body trickles
in at a few bytes a second; every connection
the gateway drops is opened again (``--reconnect-delay`` later), so the
pressure stays. Printed: the
gateway's RSS (before, peak during, and after the attackers have gone), the
normal client's p50/p99 and failures in each phase, and how the gateway
treated the attackers (dropped, answered with what). A compressed body is
measured too: a 1 MB gzip body that inflates to 1 GiB, timed as the client
sees it, with what the gateway answered.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path

import aiohttp

from bench.cpu import machine_busy_seconds, process_cpu_seconds, rss_mb
from bench.servers import WORKFLOW, ServerProcess, Tenant, create_tenant, gateway_process
from bench.vhost import own_vhost

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def worst(self) -> str:
        return f"{max(self.samples) * 1000:.0f} ms" if self.samples else "-"

    def line(self) -> str:
        if not self.samples:
            return f"no answers; failures {dict(self.failures)}"
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        failed = sum(self.failures.values())
        return (
            f"{len(ordered)} answers, p50 {statistics.median(ordered) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, failures {failed} {dict(self.failures) or ''}"
        )


async def normal_client(url: str, tenant: Tenant, seconds: float, rate: float) -> Latencies:
    """Status reads at ``rate``/s over one keep-alive connection (reopened if dropped)."""
    result = Latencies()
    headers = dict(tenant.headers)
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        next_at = loop.time()
        while loop.time() < end:
            started = time.perf_counter()
            try:
                async with session.get(
                    f"{url}/api/v1/executions/{uuid.uuid4()}", headers=headers
                ) as response:
                    await response.read()
                    if response.status == 404:
                        result.samples.append(time.perf_counter() - started)
                    else:
                        result.failures[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.failures[type(exc).__name__] += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
    return result


# -- the attacker (a process of its own, so its work never slows the normal client) ----------


def _head(path: str, extra: bytes = b"") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: gateway\r\n".encode() + extra


async def _huge_headers(host: str, port: int, kib: int, tally: Counter[str]) -> None:
    """Header lines of 8000 bytes until ``kib`` KiB are sent, then hold, never ending them."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_head(f"/api/v1/workflows/{WORKFLOW}/run"))
        line = b"X-Pad-%d: " + b"a" * 8000 + b"\r\n"
        sent = 0
        index = 0
        while sent < kib * 1024:
            chunk = line % index
            writer.write(chunk)
            sent += len(chunk)
            index += 1
            await writer.drain()
        await _hold(reader, tally, "headers")
    finally:
        writer.close()


async def _dribble(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunk: bytes
) -> bytes:
    """Send ``chunk`` every second until the server answers; the answer's start."""
    while True:
        try:
            async with asyncio.timeout(1.0):
                return await reader.read(200)
        except TimeoutError:
            writer.write(chunk)
            await writer.drain()


async def _trickle(host: str, port: int, tally: Counter[str]) -> None:
    """One short header line a second, never the last one."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_head("/health"))
        _count(await _dribble(reader, writer, b"X-Slow: 1\r\n"), tally, "trickle")
    finally:
        writer.close()


async def _slow_body(host: str, port: int, tenant: Tenant, tally: Counter[str]) -> None:
    """An authenticated submission announcing 1 MB, sending 4 bytes a second."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        headers = b"".join(f"{k}: {v}\r\n".encode() for k, v in tenant.headers)
        writer.write(
            _head(f"/api/v1/workflows/{WORKFLOW}/run", headers + b"Content-Length: 1000000\r\n\r\n")
        )
        writer.write(b'{"payload": "')
        _count(await _dribble(reader, writer, b"aaaa"), tally, "body")
    finally:
        writer.close()


async def _hold(reader: asyncio.StreamReader, tally: Counter[str], what: str) -> None:
    answer = await reader.read(200)
    _count(answer, tally, what)


def _count(answer: bytes, tally: Counter[str], what: str) -> None:
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
    tally[f"{what}: {status}"] += 1


async def _keep_open(
    make: Callable[[], Awaitable[None]], stop: Event, tally: Counter[str], delay: float
) -> None:
    """Open again ``delay`` s after each drop: the attack holds what it can, without
    turning into a flood of connections that measures the loopback, not the gateway."""
    while not stop.is_set():
        try:
            await make()
        except (OSError, ConnectionError) as exc:
            tally[f"reset while sending: {type(exc).__name__}"] += 1
        await asyncio.sleep(delay)


@dataclass(frozen=True)
class Attack:
    """What the attacker process opens against the gateway at ``host:port``."""

    host: str
    port: int
    tenant: Tenant
    connections: int  # each sending ``header_kib`` KiB of headers it never finishes
    header_kib: int
    trickles: int  # heads sent a line a second
    slow_bodies: int  # submissions announcing 1 MB, sent 4 bytes a second
    reconnect_delay: float  # seconds before a dropped connection is opened again
    out: str  # where the process writes its tally


async def _attack(attack: Attack, stop: Event) -> None:
    host, port, delay = attack.host, attack.port, attack.reconnect_delay
    tally: Counter[str] = Counter()
    tasks = []
    for i in range(attack.connections):
        tasks.append(
            asyncio.create_task(
                _keep_open(
                    lambda: _huge_headers(host, port, attack.header_kib, tally), stop, tally, delay
                )
            )
        )
        if i % 50 == 49:
            await asyncio.sleep(0.01)
    for _ in range(attack.trickles):
        tasks.append(
            asyncio.create_task(_keep_open(lambda: _trickle(host, port, tally), stop, tally, delay))
        )
    for _ in range(attack.slow_bodies):
        tasks.append(
            asyncio.create_task(
                _keep_open(lambda: _slow_body(host, port, attack.tenant, tally), stop, tally, delay)
            )
        )
    await asyncio.to_thread(stop.wait)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(Path(attack.out).write_text, repr(dict(tally)))


def attack_process(attack: Attack, stop: Event) -> None:
    # A real attacker spends its own machine's CPU, not the gateway's: here it yields.
    os.nice(10)
    asyncio.run(_attack(attack, stop))


# -- compressed bodies ----------------------------------------------------------------------------


def _bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    parts = [compressor.compress(block) for _ in range(1024)]
    return b"".join(parts) + compressor.flush()


async def compressed(url: str, tenant: Tenant) -> list[str]:
    headers = dict(tenant.headers)
    lines = []
    bomb = _bomb()
    cases = [
        *[(f"gzip bomb (1 GiB inflated) #{i}", bomb, "gzip") for i in range(3)],
        ("corrupt gzip", gzip.compress(b'{"payload": 1}')[:-8] + b"\xff" * 8, "gzip"),
        ("unknown encoding", b'{"payload": 1}', "foo"),
    ]
    async with aiohttp.ClientSession() as session:
        for name, body, encoding in cases:
            started = time.perf_counter()
            try:
                async with session.post(
                    f"{url}/api/v1/workflows/{WORKFLOW}/run",
                    data=body,
                    headers={**headers, "Content-Encoding": encoding},
                ) as response:
                    answer = f"{response.status}: {(await response.text())[:120]}"
            except aiohttp.ClientError as exc:
                answer = repr(exc)
            took = (time.perf_counter() - started) * 1000
            lines.append(f"{name} ({len(body)} bytes): {answer} after {took:.0f} ms")
    return lines


# -- the run ---------------------------------------------------------------------------------------


async def _sample_rss(pid: int, seconds: float) -> float:
    peak = 0.0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.25)
    return peak


async def run(args: argparse.Namespace) -> None:
    run_id = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp, own_vhost(args.amqp_url, run_id) as (url, _):
        directory = Path(tmp)
        tenant = await create_tenant(url, directory, f"hostile{run_id}")
        env = dict(kv.split("=", 1) for kv in args.env)
        gateway = gateway_process(
            0,
            amqp_url=url,
            tenant=tenant,
            directory=directory,
            extra_env=env,
            tree=Path(args.tree) if args.tree else None,
        )
        await gateway.start()
        try:
            await _measure(args, gateway, tenant)
        finally:
            await gateway.stop()
            if args.show_log:
                print(gateway.log_text()[-3000:])


async def _measure(args: argparse.Namespace, gateway: ServerProcess, tenant: Tenant) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    print(f"# gateway {'from ' + args.tree if args.tree else 'of this tree'}, env {args.env}")
    quiet = await normal_client(base, tenant, args.baseline, args.rate)
    print(f"RSS at start: {rss_mb(gateway.pid):.0f} MiB")
    print(f"normal client, quiet: {quiet.line()}")

    stop = multiprocessing.get_context("spawn").Event()
    out = Path(tempfile.mkdtemp()) / "attack.txt"
    attacker = multiprocessing.get_context("spawn").Process(
        target=attack_process,
        args=(
            Attack(
                host="127.0.0.1",
                port=gateway.port,
                tenant=tenant,
                connections=args.connections,
                header_kib=args.header_kib,
                trickles=args.trickles,
                slow_bodies=args.slow_bodies,
                reconnect_delay=args.reconnect_delay,
                out=str(out),
            ),
            stop,
        ),
    )
    attacker.start()
    await asyncio.sleep(args.ramp)
    cpu_before, busy_before = process_cpu_seconds(gateway.pid), machine_busy_seconds()[0]
    attacker_before = process_cpu_seconds(attacker.pid or 0)
    during, peak = await asyncio.gather(
        normal_client(base, tenant, args.duration, args.rate),
        _sample_rss(gateway.pid, args.duration),
    )
    cores = (process_cpu_seconds(gateway.pid) - cpu_before) / args.duration
    attacker_cores = (process_cpu_seconds(attacker.pid or 0) - attacker_before) / args.duration
    machine = (machine_busy_seconds()[0] - busy_before) / args.duration
    stop.set()
    await asyncio.to_thread(attacker.join, 30)
    print(
        f"attack: {args.connections} connections x {args.header_kib} KiB of unfinished "
        f"headers, {args.trickles} trickled heads, {args.slow_bodies} slow bodies; "
        f"peak RSS {peak:.0f} MiB; gateway "
        f"{cores:.2f} cores, attacker {attacker_cores:.2f}, machine {machine:.2f} of 2"
    )
    print(f"normal client, under attack: {during.line()}")
    print(f"attackers' connections, as they ended: {out.read_text() if out.exists() else '?'}")
    await asyncio.sleep(args.settle)
    print(f"RSS {args.settle:.0f} s after the attackers left: {rss_mb(gateway.pid):.0f} MiB")
    after = await normal_client(base, tenant, args.baseline, args.rate)
    print(f"normal client, after: {after.line()}")
    lines, beside = await asyncio.gather(
        compressed(base, tenant), normal_client(base, tenant, 3.0, args.rate)
    )
    for line in lines:
        print(f"compressed body: {line}")
    print(f"normal client, beside the compressed bodies: {beside.line()}, max {beside.worst()}")
    gateway.check_alive()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--amqp-url", default=os.environ.get("POLOS_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--tree", help="run the gateway of another checkout (before/after)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--header-kib", type=int, default=782)
    parser.add_argument("--trickles", type=int, default=200, help="heads sent a line a second")
    parser.add_argument("--slow-bodies", type=int, default=100)
    parser.add_argument(
        "--reconnect-delay", type=float, default=1.0, help="s before a dropped one reopens"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="normal client requests/s")
    parser.add_argument("--baseline", type=float, default=3.0, help="quiet seconds")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds to open the attack")
    parser.add_argument("--duration", type=float, default=20.0, help="measured attack seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after the attack")
    parser.add_argument("--env", action="append", default=[], help="POLOS_X=value for the gateway")
    parser.add_argument("--show-log", action="store_true")
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
