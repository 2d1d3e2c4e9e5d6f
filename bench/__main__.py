"""``python -m bench [SYSTEM ...] [--quick]``: run the benchmark suite, print the table."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import get_args

from bench import cpu
from bench.chart import write_chart
from bench.loadgen import ENGINES
from bench.phase import BenchConfig
from bench.progress import Progress
from bench.report import machine_info, markdown_report, write_json
from bench.servers import broker_version
from bench.suite import GROUPS, SYSTEMS, expand, expected_phases, git_revision, run_suite
from observe.runtime import EventLoop

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure our submission and execution paths beside the broker's limit and "
        "the peer (FastAPI + Celery); write JSON, Markdown tables and a PNG chart.",
    )
    parser.add_argument(
        "systems",
        nargs="*",
        metavar="SYSTEM",
        help=f"groups {', '.join(GROUPS)} or systems {', '.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--connections", type=int, default=64, help="HTTP connections (64)")
    parser.add_argument("--client-processes", type=int, default=2, help="load processes (2)")
    parser.add_argument("--warmup", type=float, help="seconds before measuring (2; quick 0.5)")
    parser.add_argument("--duration", type=float, help="measured seconds (10; quick 1.5)")
    parser.add_argument("--repeat", type=int, help="bare/gateway pairs, alternating (2; quick 1)")
    parser.add_argument(
        "--open-loop",
        help="fractions of saturation for open-loop runs, comma-separated "
        "(0.25,0.5,0.8; quick 0.5; '' for none)",
    )
    parser.add_argument(
        "--e2e-open-loop",
        default="0.5",
        help="end to end: fractions of the executions/s at saturation for open-loop runs (0.5)",
    )
    parser.add_argument(
        "--e2e-rate",
        default="",
        help="end to end: fixed executions/s for more open-loop runs, comma-separated (none): "
        "the same offered load for both sides of an A/B comparison",
    )
    parser.add_argument(
        "--queued",
        type=int,
        help="submissions queued for the dispatcher memory check (100000; quick 5000)",
    )
    parser.add_argument(
        "--status-records",
        type=int,
        help="records the status reads cycle through (5000; quick 500)",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="items per batch_run (100)")
    parser.add_argument(
        "--batch-connections", type=int, default=8, help="connections sending batches (8)"
    )
    parser.add_argument(
        "--recorder-events", type=int, help="events queued for the recorder (20000; quick 2000)"
    )
    parser.add_argument(
        "--recorder-processes",
        help="recorder processes, one run each, comma-separated (1,2; quick 1)",
    )
    parser.add_argument(
        "--scaling-queues", type=int, default=16, help="queues in the dispatcher scaling runs"
    )
    parser.add_argument(
        "--celery-pool", default="prefork", help="the Celery worker's pool (prefork)"
    )
    parser.add_argument(
        "--celery-concurrency", type=int, default=os.cpu_count() or 2, help="its concurrency"
    )
    parser.add_argument(
        "--worker-concurrency", type=int, default=256, help="our worker's concurrency (256)"
    )
    parser.add_argument(
        "--chart", type=Path, help="PNG chart (default: beside the JSON, same name)"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    parser.add_argument(
        "--per-core", type=int, default=os.cpu_count() or 2, help="gateways in the per-core run"
    )
    parser.add_argument("--engine", choices=ENGINES, default="raw", help="load generator engine")
    parser.add_argument(
        "--profile", action="store_true", help="also run a phase under py-spy (needs py-spy)"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateways, e.g. POLOS_PUBLISH_CHANNELS=4",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each phase, wait up to this long for the machine to be nearly idle",
    )
    parser.add_argument(
        "--event-loop",
        choices=get_args(EventLoop),
        help="POLOS_EVENT_LOOP for every process the run starts (default: as the environment "
        "says; auto = uvloop where installed)",
    )
    parser.add_argument(
        "--gateway-tree",
        type=Path,
        help="run the gateways from another checkout (before/after comparisons)",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        help="run the dispatchers, workers and recorders from another checkout (before/after "
        "comparisons)",
    )
    parser.add_argument("--label", default="", help="a note stored with the results")
    parser.add_argument("--output", type=Path, help="JSON result file (default bench/results/)")
    parser.add_argument(
        "--amqp-url", default=os.environ.get("POLOS_AMQP_URL", DEFAULT_AMQP_URL), help="RabbitMQ"
    )
    return parser


def _fractions(text: str) -> tuple[float, ...]:
    return tuple(float(f) for f in text.split(",") if f.strip())


def _config(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    if args.open_loop is None:
        fractions: tuple[float, ...] = (0.5,) if quick else (0.25, 0.5, 0.8)
    else:
        fractions = _fractions(args.open_loop)
    env = dict(item.split("=", 1) for item in args.gateway_env)
    return BenchConfig(
        amqp_url=args.amqp_url,
        quick=quick,
        connections=args.connections,
        client_processes=max(1, min(args.client_processes, args.connections)),
        warmup_s=args.warmup if args.warmup is not None else (0.5 if quick else 2.0),
        duration_s=args.duration if args.duration is not None else (1.5 if quick else 10.0),
        open_loop_fractions=fractions,
        e2e_fractions=_fractions(args.e2e_open_loop),
        e2e_rates=tuple(float(r) for r in args.e2e_rate.split(",") if r.strip()),
        queued_submissions=args.queued or (5_000 if quick else 100_000),
        scaling_queues=args.scaling_queues,
        status_records=args.status_records or (500 if quick else 5_000),
        batch_size=args.batch_size,
        batch_connections=max(1, min(args.batch_connections, args.connections)),
        recorder_events=args.recorder_events or (2_000 if quick else 20_000),
        recorder_processes=tuple(
            int(n) for n in (args.recorder_processes or ("1" if quick else "1,2")).split(",")
        ),
        celery_pool=args.celery_pool,
        celery_concurrency=args.celery_concurrency,
        worker_concurrency=args.worker_concurrency,
        keep_logs=args.keep_logs.resolve() if args.keep_logs else None,
        per_core_processes=args.per_core,
        engine=args.engine,
        repeat=args.repeat if args.repeat is not None else (1 if quick else 2),
        profile=args.profile,
        gateway_env=env,
        wait_quiet_s=args.wait_quiet,
        gateway_tree=args.gateway_tree.resolve() if args.gateway_tree else None,
        tree=args.tree.resolve() if args.tree else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.event_loop:
        os.environ["POLOS_EVENT_LOOP"] = args.event_loop  # every process inherits it
    config = _config(args)
    try:
        systems = expand(args.systems)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    started = time.monotonic()
    load = cpu.loadavg()
    progress = Progress(expected_phases(config, systems))
    progress.note(
        f"bench: {', '.join(systems)}; {config.duration_s:g} s per phase after "
        f"{config.warmup_s:g} s warm-up; loadavg {load:.2f} on {os.cpu_count()} cores"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        progress.note("warning: the machine is busy; figures will be low and noisy")
    version = asyncio.run(broker_version(config.amqp_url))
    run = asyncio.run(run_suite(config, systems, progress))
    report = markdown_report(run.results, run.memory)
    print(report)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    output = args.output or config.results_dir / f"{stamp}-{run.run_id}.json"
    config_dict = asdict(config)
    config_dict["results_dir"] = str(config.results_dir)
    config_dict["gateway_tree"] = str(config.gateway_tree) if config.gateway_tree else None
    config_dict["keep_logs"] = str(config.keep_logs) if config.keep_logs else None
    config_dict["tree"] = str(config.tree) if config.tree else None
    config_dict["amqp_url"] = "<redacted>"
    config_dict["vhost"] = run.vhost
    config_dict["event_loop"] = os.environ.get("POLOS_EVENT_LOOP", "auto")
    chart = write_chart(
        run.results,
        args.chart or output.with_suffix(".png"),
        title=f"python -m bench{' --quick' if config.quick else ''}: {os.cpu_count()} cores, "
        f"broker + systems + load generator on one machine ({time.strftime('%Y-%m-%d')})",
    )
    if chart is not None:
        run.artifacts["chart"] = str(chart)
    table_path = output.with_suffix(".md")
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(report)
    run.artifacts["markdown"] = str(table_path)
    write_json(
        output,
        command=[sys.executable, "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        label=args.label,
        revision=git_revision(),
        machine=machine_info(version),
        config=config_dict,
        measurements=run.results,
        memory=run.memory,
        artifacts=run.artifacts,
    )
    print(f"results: {output}  ({time.monotonic() - started:.0f} s)")
    for name, path in sorted(run.artifacts.items()):
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
