"""``python -m gateway``: serve, or administer projects, keys, deployments and queues."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence

from broker.registry import register_deployment
from gateway.app import create_app
from gateway.auth import create_admin_key, create_key, revoke_key
from gateway.queues import configure_queue
from gateway.server import serve_until_signalled
from gateway.settings import Settings
from observe import setup_logging
from observe.runtime import run, tune_gc
from schemas.api import INT32_MAX, QUEUE_NAME_PATTERN
from schemas.registry import CONCURRENCY_STRATEGIES
from schemas.topology import DEPLOYMENT_ID_PATTERN, MAX_WORKFLOW_ID_LENGTH, PROJECT_ID_PATTERN


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the HTTP gateway (the default)")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key for a project; prints it once")
    whose = create.add_mutually_exclusive_group(required=True)
    whose.add_argument("--project")
    whose.add_argument(
        "--admin", action="store_true", help="an operator key: opens /ui, no project's API"
    )
    create.add_argument(
        "--key", help="record this key instead of generating one (development setups)"
    )
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("--id", required=True)

    deployments = sub.add_parser("deployments", help="registry").add_subparsers(
        dest="deployments_command", required=True
    )
    register = deployments.add_parser(
        "register", help="record a deployment and its workflows (what a worker fleet does)"
    )
    register.add_argument("--project", required=True)
    register.add_argument("--deployment", required=True)
    register.add_argument("--workflow", action="append", required=True, dest="workflows")

    queues = sub.add_parser("queues", help="queue configuration").add_subparsers(
        dest="queues_command", required=True
    )
    configure = queues.add_parser(
        "set",
        help="set a queue's concurrency limit and/or strategy (as a submission carrying "
        "queue_concurrency_limit / concurrency_strategy does; the latest wins)",
    )
    configure.add_argument("--project", required=True)
    configure.add_argument("--queue", required=True)
    configure.add_argument("--limit", type=int, help=f"concurrency limit, 1 to {INT32_MAX}")
    configure.add_argument(
        "--strategy", choices=CONCURRENCY_STRATEGIES, help="what the queue does with keys"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    setup_logging(settings.observe)
    if args.command in (None, "serve"):
        app = create_app(settings)
        tune_gc()
        run(serve_until_signalled(app, settings), settings.event_loop)
        return 0
    if args.command == "keys":
        if args.keys_command == "create" and args.admin:
            key, key_id = create_admin_key(settings.projects_file, args.key)
            print(key)
            print(f"# admin key id {key_id}", file=sys.stderr)
            return 0
        if args.keys_command == "create":
            key, key_id = create_key(settings.projects_file, args.project, args.key)
            print(key)
            print(f"# key id {key_id} for project {args.project}", file=sys.stderr)
            return 0
        if revoke_key(settings.projects_file, args.id):
            print(f"revoked {args.id}; send SIGHUP to running gateways", file=sys.stderr)
            return 0
        print(f"no key {args.id}", file=sys.stderr)
        return 1
    if args.command == "queues":
        return _set_queue(settings, args)
    problem = _deployment_problem(args.project, args.deployment, args.workflows)
    if problem is not None:
        print(f"cannot register: {problem}", file=sys.stderr)
        return 2
    asyncio.run(
        register_deployment(
            settings.amqp_url.get_secret_value(),
            args.project,
            args.deployment,
            args.workflows,
            replicas=settings.quorum_group_size,
        )
    )
    print(f"registered {args.project}/{args.deployment}: {', '.join(args.workflows)}")
    return 0


def _set_queue(settings: Settings, args: argparse.Namespace) -> int:
    problem = _queue_problem(args.project, args.queue, args.limit, args.strategy)
    if problem is not None:
        print(f"cannot set: {problem}", file=sys.stderr)
        return 2
    events = asyncio.run(
        configure_queue(
            settings.amqp_url.get_secret_value(),
            args.project,
            args.queue,
            limit=args.limit,
            strategy=args.strategy,
            max_length=settings.queue_max_length,
            replicas=settings.quorum_group_size,
        )
    )
    said = [f"limit {args.limit}"] * (args.limit is not None)
    said += [f"strategy {args.strategy}"] * (args.strategy is not None)
    print(f"{args.project}/{args.queue}: {', '.join(said)} ({len(events)} registry event(s))")
    return 0


def _queue_problem(project: str, queue: str, limit: int | None, strategy: str | None) -> str | None:
    if not re.fullmatch(PROJECT_ID_PATTERN, project):
        return f"project id {project!r} must match {PROJECT_ID_PATTERN}"
    if not re.fullmatch(QUEUE_NAME_PATTERN, queue):
        return f"queue name {queue!r} must match {QUEUE_NAME_PATTERN}"
    if limit is None and strategy is None:
        return "give --limit, --strategy or both"
    if limit is not None and not 1 <= limit <= INT32_MAX:
        return f"--limit {limit}: 1 to {INT32_MAX} are allowed"
    return None


def _deployment_problem(project: str, deployment: str, workflows: Sequence[str]) -> str | None:
    """What makes these names unregistrable (the registry event would refuse them)."""
    if not re.fullmatch(PROJECT_ID_PATTERN, project):
        return f"project id {project!r} must match {PROJECT_ID_PATTERN}"
    if not re.fullmatch(DEPLOYMENT_ID_PATTERN, deployment):
        return f"deployment id {deployment!r} must match {DEPLOYMENT_ID_PATTERN}"
    for workflow in workflows:
        if not 0 < len(workflow) <= MAX_WORKFLOW_ID_LENGTH:
            return (
                f"workflow id of {len(workflow)} characters: 1 to "
                f"{MAX_WORKFLOW_ID_LENGTH} are allowed"
            )
    return None
