"""Workflows the worker tests run, in-process and in ``python -m worker`` subprocesses.

A subprocess names ``tests.workflows:make_worker``; the project and deployment
come from ``POLOS_TEST_PROJECT`` and ``POLOS_TEST_DEPLOYMENT`` so that every
test uses names of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from worker import DEFAULT_RETRIES, ExecutionContext, Worker


async def echo(ctx: ExecutionContext, payload: Any) -> Any:
    return payload


async def fail(ctx: ExecutionContext, payload: Any) -> Any:
    raise ValueError(f"cannot handle {payload!r}")


async def sleep(ctx: ExecutionContext, payload: Any) -> Any:
    """Sleeps ``payload["seconds"]``, then returns ``payload.get("result")``."""
    await asyncio.sleep(float(payload["seconds"]))
    return payload.get("result")


async def slow_first(ctx: ExecutionContext, payload: Any) -> Any:
    """Hangs on its first delivery (to be killed), finishes on a redelivery."""
    if not ctx.redelivered:
        await asyncio.sleep(3600)
    return {"redelivered": ctx.redelivered, "worker_id": ctx.worker_id}


async def unserializable(ctx: ExecutionContext, payload: Any) -> Any:
    return object()


async def nested(ctx: ExecutionContext, payload: Any) -> Any:
    """Returns a value nested ``payload`` levels of lists deep."""
    value: Any = 1
    for _ in range(payload):
        value = [value]
    return value


async def context(ctx: ExecutionContext, payload: Any) -> Any:
    return {
        "execution_id": ctx.execution_id,
        "workflow_id": ctx.workflow_id,
        "project_id": ctx.project_id,
        "deployment_id": ctx.deployment_id,
        "queue_name": ctx.queue_name,
        "dispatch_id": ctx.dispatch_id,
        "deadline": ctx.deadline,
        "lease_seconds": ctx.lease_seconds,
        "session_id": ctx.session_id,
        "user_id": ctx.user_id,
        "initial_state": ctx.initial_state,
        "parent_execution_id": ctx.parent_execution_id,
        "root_execution_id": ctx.root_execution_id,
        "concurrency_key": ctx.concurrency_key,
        "worker_id": ctx.worker_id,
        "submitted_by": ctx.submission.submitted_by,
    }


async def traced(ctx: ExecutionContext, payload: Any) -> Any:
    """Logs one line (the worker's log context adds the ids) and returns its traceparent."""
    logging.getLogger("tests.workflows").info("traced run")
    return {"traceparent": ctx.traceparent}


WORKFLOWS = {
    "echo": echo,
    "fail": fail,
    "sleep": sleep,
    "slow_first": slow_first,
    "unserializable": unserializable,
    "nested": nested,
    "context": context,
    "traced": traced,
}


# The tests of a failure see it as the execution's end: no retries.
RETRIES = {"fail": 0}


def add_workflows(worker: Worker) -> Worker:
    for workflow_id, handler in WORKFLOWS.items():
        worker.add_workflow(workflow_id, handler, retries=RETRIES.get(workflow_id, DEFAULT_RETRIES))
    return worker


def make_worker() -> Worker:
    return add_workflows(
        Worker(
            project=os.environ["POLOS_TEST_PROJECT"],
            deployment=os.environ["POLOS_TEST_DEPLOYMENT"],
        )
    )
