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

from bench import cpu
from bench.loadgen import ENGINES
from bench.report import (
    machine_info,
    markdown_table,
    targets,
    targets_table,
    write_json,
)
from bench.servers import broker_version
from bench.stats import Measurement
from bench.suite import GROUPS, SYSTEMS, BenchConfig, expand, git_revision, run_suite

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the gateway beside the broker's limit; print a Markdown table.",
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
    parser.add_argument("--warmup", type=float, help="seconds before measuring (2; quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds (15; quick 4)")
    parser.add_argument("--repeat", type=int, help="bare/gateway pairs, alternating (2; quick 1)")
    parser.add_argument(
        "--open-loop",
        help="fractions of saturation for open-loop runs, comma-separated "
        "(0.25,0.5,0.8; quick 0.5; '' for none)",
    )
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
    parser.add_argument("--uvloop", action="store_true", help="experiment: gateways on uvloop")
    parser.add_argument(
        "--gateway-tree",
        type=Path,
        help="run the gateways from another checkout (before/after comparisons)",
    )
    parser.add_argument("--label", default="", help="a note stored with the results")
    parser.add_argument("--output", type=Path, help="JSON result file (default bench/results/)")
    parser.add_argument(
        "--amqp-url", default=os.environ.get("POLOS_AMQP_URL", DEFAULT_AMQP_URL), help="RabbitMQ"
    )
    return parser


def _config(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    if args.open_loop is None:
        fractions: tuple[float, ...] = (0.5,) if quick else (0.25, 0.5, 0.8)
    else:
        fractions = tuple(float(f) for f in args.open_loop.split(",") if f.strip())
    env = dict(item.split("=", 1) for item in args.gateway_env)
    return BenchConfig(
        amqp_url=args.amqp_url,
        quick=quick,
        connections=args.connections,
        client_processes=max(1, min(args.client_processes, args.connections)),
        warmup_s=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        duration_s=args.duration if args.duration is not None else (4.0 if quick else 15.0),
        open_loop_fractions=fractions,
        per_core_processes=args.per_core,
        engine=args.engine,
        repeat=args.repeat if args.repeat is not None else (1 if quick else 2),
        profile=args.profile,
        gateway_env=env,
        uvloop=args.uvloop,
        wait_quiet_s=args.wait_quiet,
        gateway_tree=args.gateway_tree.resolve() if args.gateway_tree else None,
    )


def _progress(m: Measurement) -> None:
    bad = sum(m.non_ok.values()) + m.errors + m.unsent
    print(
        f"  {m.system:<36} {m.mode:<24} {m.rate:>9,.0f}/s  p50 {m.p50_ms:6.1f} ms  "
        f"p99 {m.p99_ms:6.1f} ms  not ok {bad}  cores {m.cpu}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _config(args)
    try:
        systems = expand(args.systems)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    started = time.monotonic()
    load = cpu.loadavg()
    print(
        f"bench: {', '.join(systems)}; {config.duration_s:g} s per phase after "
        f"{config.warmup_s:g} s warm-up; loadavg {load:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print("  warning: the machine is busy; figures will be low and noisy", flush=True)
    version = asyncio.run(broker_version(config.amqp_url))
    run = asyncio.run(run_suite(config, systems, _progress))
    table = markdown_table(run.results)
    checks = targets(run.results)
    print()
    print(table)
    if checks:
        print()
        print(targets_table(checks))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    output = args.output or config.results_dir / f"{stamp}-{run.run_id}.json"
    config_dict = asdict(config)
    config_dict["results_dir"] = str(config.results_dir)
    config_dict["gateway_tree"] = str(config.gateway_tree) if config.gateway_tree else None
    config_dict["amqp_url"] = "<redacted>"
    write_json(
        output,
        command=[sys.executable, "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        label=args.label,
        revision=git_revision(),
        machine=machine_info(version),
        config=config_dict,
        measurements=run.results,
        artifacts=run.artifacts,
    )
    print(f"\nresults: {output}  ({time.monotonic() - started:.0f} s)")
    if "profile" in run.artifacts:
        print(f"profile: {run.artifacts['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
