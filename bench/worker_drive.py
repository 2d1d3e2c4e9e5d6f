"""The worker alone, at a fixed rate: its CPU per execution, without the rest of the system.

    python -m bench.worker_drive [--tree DIR] [--rate 800] [--duration 10] [--env NAME=VALUE]
    python -m bench.worker_drive [--tree DIR] --preload 20000

Plays the dispatcher's part on the wire (as tests/worker_harness.py does): a
results queue, work messages published at ``--rate`` per second (a batch every
``--tick``, 1 ms), results consumed and acknowledged. The worker is a real ``python -m
worker bench.e2e_worker:create`` process (the e2e benchmark's no-op
workflow), run from ``--tree`` (another checkout) or this one. Prints the
worker's CPU per execution over the measured window. With the gateway and
dispatcher out of the picture, an A/B pair is less at the mercy of how busy
the shared machine is than ``python -m bench e2e``.

``--preload N`` queues N work messages before the worker starts instead and
measures from its first result to its last: the worker at full speed, with
no publisher in the loop to keep up (nor to share the cores with). Executions
are counted by the reports the results carry (a worker's ``Results`` message
carries many).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aio_pika

from bench.cpu import process_cpu_seconds
from broker.connection import Nodes, connect_robust
from broker.publisher import ConfirmedPublisher
from broker.topology import declare_results_queue, declare_work_queue
from schemas.dispatch import decode_reports, encode_work
from schemas.envelope import make_submission
from schemas.ids import new_execution_id
from schemas.topology import results_queue, work_queue

ROOT = Path(__file__).resolve().parent.parent


def _work(project: str, queue: str) -> bytes:
    execution_id, created_at = new_execution_id()
    submission = make_submission(
        execution_id=execution_id,
        created_at=created_at,
        project_id=project,
        workflow_id="noop",
        payload={"n": 1},
    )
    return encode_work(
        dispatch_id=uuid.uuid4().hex,
        deadline=time.time() + 60,
        results_queue=queue,
        submission_raw=submission,
    )


async def drive(args: argparse.Namespace, tree: Path, records: str) -> None:
    project = f"drive{uuid.uuid4().hex[:8]}"
    python = tree / ".venv" / "bin" / "python"
    connection = await connect_robust(Nodes.parse(args.amqp_url), "worker-drive")
    results = results_queue(project, "q")
    works = work_queue(project, "v1")
    await declare_results_queue(connection, results)
    publisher = ConfirmedPublisher(connection, confirm_timeout=10)
    await publisher.start()
    received = 0
    first: tuple[float, int, float] | None = None  # --preload: CPU, count, time at the first
    worker_pid = 0
    drained = asyncio.Event()

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received, first
        received += len(decode_reports(message.body))
        if args.preload:
            if first is None:
                first = process_cpu_seconds(worker_pid), received, time.perf_counter()
            if received >= args.preload:
                drained.set()
        await message.ack()

    if args.preload:
        await declare_work_queue(connection, works)
        for sent in range(0, args.preload, 500):
            await asyncio.gather(
                *(
                    publisher.publish(works, _work(project, results), message_id=uuid.uuid4().hex)
                    for _ in range(min(500, args.preload - sent))
                )
            )

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    queue = await channel.declare_queue(results, passive=True)
    await queue.consume(on_result)

    env = {
        **os.environ,
        "POLOS_AMQP_URL": args.amqp_url,
        "POLOS_WORKER_CONCURRENCY": "256",
        "BENCH_PROJECT": project,
        "BENCH_DEPLOYMENT": "v1",
        "BENCH_WORKFLOW": "noop",
        "BENCH_RECORDS": records,
        **dict(item.split("=", 1) for item in args.env),
    }
    worker = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "worker",
        "bench.e2e_worker:create",
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(f"worker pid {worker.pid}", flush=True)
    worker_pid = worker.pid
    try:
        if args.preload:
            await _drained(args, tree, worker_pid, drained, lambda: (first, received))
            return
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.2)
                with contextlib.suppress(Exception):
                    async with connection.channel() as probe:
                        declared = await probe.declare_queue(works, passive=True)
                        if declared.declaration_result.consumer_count:
                            break
        loop = asyncio.get_running_loop()
        tick = args.tick
        per_tick = args.rate * tick
        owed = 0.0
        pending: set[asyncio.Task[None]] = set()
        start = loop.time()
        measuring_from = start + args.warmup
        until = measuring_from + args.duration
        cpu0 = got0 = None
        next_tick = start
        while loop.time() < until:
            if cpu0 is None and loop.time() >= measuring_from:
                cpu0, got0, t0 = process_cpu_seconds(worker.pid), received, time.perf_counter()
            owed += per_tick
            while owed >= 1:
                owed -= 1
                task = asyncio.create_task(
                    publisher.publish(works, _work(project, results), message_id=uuid.uuid4().hex)
                )
                pending.add(task)
                task.add_done_callback(pending.discard)
            next_tick += tick
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
        assert cpu0 is not None
        assert got0 is not None
        cpu = process_cpu_seconds(worker.pid) - cpu0
        done = received - got0
        wall = time.perf_counter() - t0
        print(
            f"{args.label or tree.name}: {done / wall:,.0f} exec/s offered {args.rate:,.0f}; "
            f"worker {cpu / wall:.3f} cores, {cpu / max(done, 1) * 1e6:,.0f} µs/exec"
        )
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        worker.terminate()
        try:
            async with asyncio.timeout(10):
                await worker.wait()
        except TimeoutError:
            worker.kill()
            await worker.wait()
        with contextlib.suppress(Exception):
            async with connection.channel() as cleanup:
                await cleanup.queue_delete(results)
                await cleanup.queue_delete(works)
        await connection.close()


async def _drained(
    args: argparse.Namespace,
    tree: Path,
    pid: int,
    drained: asyncio.Event,
    counts: Callable[[], tuple[tuple[float, int, float] | None, int]],
) -> None:
    async with asyncio.timeout(args.preload / 100 + 60):
        await drained.wait()
    first, received = counts()
    assert first is not None
    cpu = process_cpu_seconds(pid) - first[0]
    done = received - first[1]
    wall = time.perf_counter() - first[2]
    print(
        f"{args.label or tree.name}: {done / wall:,.0f} exec/s draining {args.preload:,}; "
        f"worker {cpu / wall:.3f} cores, {cpu / max(done, 1) * 1e6:,.0f} µs/exec"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="run the worker from this checkout")
    parser.add_argument("--rate", type=float, default=800.0, help="work messages a second")
    parser.add_argument("--tick", type=float, default=0.001, help="seconds between batches")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the worker")
    parser.add_argument(
        "--preload", type=int, default=0, help="queue this many first, measure their draining"
    )
    parser.add_argument("--label", default="")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    tree = Path(args.tree).resolve() if args.tree else ROOT
    handle, records = tempfile.mkstemp(prefix="drive-", suffix=".records")
    os.close(handle)
    try:
        asyncio.run(drive(args, tree, records))
    finally:
        Path(records).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
