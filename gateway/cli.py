"""``python -m gateway``: serve, or administer projects, keys and deployments."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence

from broker.registry import register_deployment
from gateway.app import create_app
from gateway.auth import create_admin_key, create_key, revoke_key
from gateway.server import serve_until_signalled
from gateway.settings import Settings
from observe import setup_logging
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    setup_logging(settings.observe)
    if args.command in (None, "serve"):
        asyncio.run(serve_until_signalled(create_app(settings), settings))
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
