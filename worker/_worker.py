"""``Worker``: what a fleet builds, decorates with its workflows, and runs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from pydantic import SecretStr

from schemas.topology import (
    DEPLOYMENT_ID_PATTERN,
    MAX_WORKFLOW_ID_LENGTH,
    PROJECT_ID_PATTERN,
    work_queue,
)
from worker._consumer import Consumer
from worker._delivery import Handler
from worker._observe import WorkerObserver
from worker._retry import DEFAULT_BACKOFF, DEFAULT_RETRIES, Backoff, RetryPolicy
from worker._settings import WorkerSettings

log = logging.getLogger("worker")

H = TypeVar("H", bound=Handler)


class Worker:
    """Runs the workflows of one deployment of one project.

    ``amqp_url``, ``concurrency`` and ``drain_timeout`` default to
    ``POLOS_AMQP_URL``, ``POLOS_WORKER_CONCURRENCY`` and
    ``POLOS_WORKER_DRAIN_TIMEOUT_SECONDS`` (see ``WorkerSettings``).
    """

    def __init__(
        self,
        project: str,
        deployment: str,
        *,
        concurrency: int | None = None,
        amqp_url: str | None = None,
        drain_timeout: float | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        if not re.fullmatch(PROJECT_ID_PATTERN, project):
            raise ValueError(f"invalid project id {project!r}")
        if not re.fullmatch(DEPLOYMENT_ID_PATTERN, deployment):
            raise ValueError(
                f"invalid deployment id {deployment!r}: it must match {DEPLOYMENT_ID_PATTERN}"
            )
        updates: dict[str, object] = {}
        if concurrency is not None:
            updates["worker_concurrency"] = concurrency
        if amqp_url is not None:
            updates["amqp_url"] = SecretStr(amqp_url)
        if drain_timeout is not None:
            updates["worker_drain_timeout_seconds"] = drain_timeout
        base = settings or WorkerSettings()
        # model_validate re-checks the bounds of the overrides.
        self.settings = WorkerSettings.model_validate({**base.model_dump(), **updates})
        self.project = project
        self.deployment = deployment
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._workflows: dict[str, Handler] = {}
        self._policies: dict[str, RetryPolicy] = {}
        self._consumer: Consumer | None = None
        self.observer = WorkerObserver(
            self.settings.observe,
            running=lambda: len(self.running),
            concurrency=self.settings.worker_concurrency,
        )

    @property
    def concurrency(self) -> int:
        return self.settings.worker_concurrency

    @property
    def work_queue(self) -> str:
        return work_queue(self.project, self.deployment)

    @property
    def workflows(self) -> Mapping[str, Handler]:
        return MappingProxyType(self._workflows)

    @property
    def running(self) -> frozenset[str]:
        """Execution ids this worker holds right now (running, or waiting for a slot)."""
        return self._consumer.running if self._consumer is not None else frozenset()

    @property
    def retry_policies(self) -> Mapping[str, RetryPolicy]:
        return MappingProxyType(self._policies)

    def workflow(
        self,
        workflow_id: str,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff: float | Backoff = DEFAULT_BACKOFF,
    ) -> Callable[[H], H]:
        """Register ``async def handler(ctx, payload)`` as the workflow ``workflow_id``.

        A run that raises is run again up to ``retries`` times (default 2, as
        Polos), after a wait of ``backoff``: seconds before the first retry,
        doubling, jittered (or a ``Backoff``). ``NonRetryableError`` ends it at
        once; the run timeout covers every run and every wait.
        """

        def register(handler: H) -> H:
            self.add_workflow(workflow_id, handler, retries=retries, backoff=backoff)
            return handler

        return register

    def add_workflow(
        self,
        workflow_id: str,
        handler: Handler,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff: float | Backoff = DEFAULT_BACKOFF,
    ) -> None:
        """``workflow`` without the decorator."""
        policy = RetryPolicy.of(retries, backoff)
        if not workflow_id:
            raise ValueError("workflow_id must not be empty")
        if len(workflow_id) > MAX_WORKFLOW_ID_LENGTH:
            raise ValueError(
                f"workflow id of {len(workflow_id)} characters: at most "
                f"{MAX_WORKFLOW_ID_LENGTH} are allowed"
            )
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"workflow {workflow_id!r}: the handler must be an async function")
        if workflow_id in self._workflows:
            raise ValueError(f"workflow {workflow_id!r} is already registered")
        if self._consumer is not None:
            raise RuntimeError("workflows must be registered before the worker starts")
        self._workflows[workflow_id] = handler
        self._policies[workflow_id] = policy

    async def start(self) -> None:
        """Connect, register the deployment, and start consuming; returns once consuming."""
        if self._consumer is not None:
            raise RuntimeError("the worker is already started")
        if not self._workflows:
            raise RuntimeError("no workflow registered")
        settings = self.settings
        consumer = Consumer(
            amqp_url=settings.amqp_url.get_secret_value(),
            project=self.project,
            deployment=self.deployment,
            workflows={wf: self.observer.wrap(wf, h) for wf, h in self._workflows.items()},
            retry_policies=self._policies,
            concurrency=settings.worker_concurrency,
            worker_id=self.worker_id,
            confirm_timeout=settings.confirm_timeout_seconds,
            reconnect_interval=settings.reconnect_interval_seconds,
            replicas=settings.quorum_group_size,
            running_delay=settings.worker_running_delay_seconds,
            hold_seconds=settings.worker_hold_seconds,
            write_linger=settings.worker_write_linger_seconds,
        )
        await self.observer.start()
        try:
            await consumer.start()
        except BaseException:
            await self.observer.close()
            raise
        self._consumer = consumer

    async def stop(self, *, drain_timeout: float | None = None) -> None:
        """Stop taking work; let running executions finish for up to ``drain_timeout``
        seconds; hand back (requeue) what still runs then; disconnect."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        if drain_timeout is None:
            drain_timeout = self.settings.worker_drain_timeout_seconds
        try:
            await consumer.stop(drain_timeout)
        finally:
            await self.observer.close()

    async def wait_idle(self) -> None:
        """Until nothing runs here and the work queue is empty (what burst mode waits for)."""
        if self._consumer is None:
            raise RuntimeError("the worker is not started")
        await self._consumer.wait_idle()

    async def run(self, *, burst: bool = False) -> None:
        """Run until SIGTERM/SIGINT (then drain), or with ``burst`` until idle.

        A signal while still connecting exits at once (nothing is held yet); a
        second signal during the drain hands back what still runs at once.
        """
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set() and self._consumer is not None:
                self._consumer.hurry()
            stop.set()

        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
        try:
            if await _first(self.start(), stop.wait()) != 0:
                log.info("worker %s stopped before it started", self.worker_id)
                await self.stop()  # in case it started while the signal was handled
                return
            assert self._consumer is not None
            consumer = self._consumer
            try:
                await _first(stop.wait(), consumer.wait_idle() if burst else _forever())
            finally:
                log.info("worker %s stopping", self.worker_id)
                await self.stop()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


async def _forever() -> None:
    await asyncio.Event().wait()


async def _first(*aws: Coroutine[Any, Any, Any]) -> int:
    """Run ``aws`` until one ends; cancel the others; the index of the one that ended.

    Its exception, if any, propagates.
    """
    tasks = [asyncio.create_task(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    index = next(i for i, task in enumerate(tasks) if task in done)
    tasks[index].result()
    return index
