"""One submission queue, as its owner runs it: consume, decide, let go.

Every dispatcher that matches a queue consumes it; single active consumer
makes exactly one of them the owner, and only the owner gets deliveries. So
the results consumer starts lazily, on the first delivery, and is cancelled
whenever we let go of the queue (the results queue is single-active too).

A submission stays unacknowledged until its execution is terminal; so does
the marker (a copy of the work message) that reaches the results queue in the
same publish as the work. Whoever owns the queue next finds both (requeued)
and knows the execution is running: ``results.py``. The gate decides
(``admission.py``); what happens to an admitted execution is ``runs.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError

from broker.deadletter import dead_letter
from broker.errors import BrokerError
from dispatcher.admission import Execution, Gate, Phase, Verdict
from dispatcher.consumers import CHANNEL_GONE, Consumer, Delivery
from dispatcher.results import ResultsHandler
from dispatcher.runs import Runs
from dispatcher.work import Links
from schemas.envelope import decode_submission
from schemas.topology import results_queue, submit_queue

log = logging.getLogger(__name__)


class _Token:
    """Deliveries of a consumer we cancelled are handed back, not handled."""

    __slots__ = ("live",)

    def __init__(self) -> None:
        self.live = True


class QueueOwner:
    def __init__(self, links: Links, project_id: str, queue_name: str, limit: int | None) -> None:
        self.links = links
        self.settings = links.settings
        self.project_id = project_id
        self.queue_name = queue_name
        self.name = submit_queue(project_id, queue_name)
        self.results_name = results_queue(project_id, queue_name)
        self.gate = Gate(limit)
        self.window = self.settings.window_for(limit)
        self.loop = asyncio.get_running_loop()
        self.runs = Runs(self)
        self.results = ResultsHandler(self)
        self._submissions: Consumer | None = None
        self._submissions_token = _Token()
        self._results: Consumer | None = None
        self._results_token = _Token()
        self._results_starting = False
        self._reconsume_wanted = False
        self._letting_go = False
        self._draining = False
        self._stopped = False
        self._busy = False
        self._owning = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<QueueOwner {self.name}>"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Consume the queue (the session made sure it exists)."""
        await self._consume()

    def set_limit(self, limit: int | None) -> None:
        """A new limit applies at once; a window too small for it is renewed when idle."""
        if limit == self.gate.limit:
            return
        log.info("%s: concurrency limit %s -> %s", self.name, self.gate.limit, limit)
        self.gate.limit = limit
        cap = self.settings.window_for(None) if limit is None else limit
        if cap > self.window and not self._draining:
            self._reconsume_wanted = True
        self.pump()

    def drain(self) -> None:
        """Admit nothing more; what is in flight runs to its end."""
        self._draining = True
        self._reconsume_wanted = False
        self.gate.admitting = False

    @property
    def held(self) -> int:
        return len(self.gate.held)

    def stop(self) -> None:
        """Forget everything (the connection is closing, or the queue is gone)."""
        self._stopped = True
        self._submissions_token.live = False
        self._results_token.live = False
        for execution in list(self.gate.held.values()) + list(self.gate.pending):
            if execution.timer is not None:
                execution.timer.cancel()
        for orphan in self.gate.orphans.values():
            if orphan.timer is not None:
                orphan.timer.cancel()
        for task in self._tasks:
            task.cancel()
        self._set_busy(False)

    async def _consume(self) -> None:
        self._owning = False
        token = self._submissions_token = _Token()
        self._submissions = await self.links.pool.consume(
            self.name,
            prefetch=self.window,
            on_message=lambda delivery: self._on_submission(delivery, token),
            on_cancelled=self._on_gone,
        )

    def _on_gone(self) -> None:
        log.warning(
            "%s: consumer cancelled by the broker (queue deleted); letting it go", self.name
        )
        self.stop()
        self.links.gone(self.project_id, self.queue_name)
        self.spawn(self._cancel_consumers())  # stop() cancelled the tasks before it

    async def _cancel_consumers(self) -> None:
        for consumer in (self._results, self._submissions):
            if consumer is not None:
                await self.links.pool.cancel(consumer)
        self._results = self._submissions = None

    # -- submissions -----------------------------------------------------------------

    def _on_submission(self, delivery: Delivery, token: _Token) -> None:
        self.links.activity()
        if not token.live or self._letting_go or self._stopped:
            self.spawn(delivery.nack(requeue=True))
            return
        if not self._owning:
            self._owning = True
            log.info("%s: we own it now (first delivery)", self.name)
        try:
            envelope = decode_submission(delivery.body)
        except ValidationError as exc:
            self.spawn(self.poison(delivery, self.name, f"undecodable submission: {exc}"))
            return
        self._ensure_results()
        execution = Execution(envelope, delivery.body, delivery, attempt=delivery.attempt)
        orphan = None
        if delivery.redelivered:
            # It may be running on a worker, dispatched by an owner that is gone:
            # its marker may be here already, or arrive within the grace.
            orphan = self.gate.orphans.pop(envelope.execution_id, None)
            if orphan is None:
                execution.recover_until = (
                    self.loop.time() + self.settings.dispatcher_recovery_grace_seconds
                )
        self.gate.enqueue(execution)
        if orphan is not None:
            self.results.adopt(execution, orphan)
        self.pump()

    def pump(self) -> None:
        """Settle the head of the queue for as long as it can be."""
        if self._stopped:
            return
        now = self.loop.time()
        while (decision := self.gate.next(now)) is not None:
            execution = decision.execution
            if decision.verdict is Verdict.RECOVER:
                assert execution.recover_until is not None
                execution.timer = self.loop.call_at(
                    execution.recover_until, self._recovery_over, execution
                )
            elif decision.verdict is Verdict.DEDUPLICATE:
                assert decision.duplicate_of is not None
                self.runs.deduplicate(execution, decision.duplicate_of)
            else:
                self.runs.admit(execution)
        self._maybe_reconsume()
        self._set_busy(self.gate.busy)

    def _recovery_over(self, execution: Execution) -> None:
        execution.timer = None
        if execution.phase is not Phase.RECOVERING:
            return
        decision = self.gate.resolve_recovering(execution)
        if decision is not None:
            if decision.verdict is Verdict.DEDUPLICATE:
                assert decision.duplicate_of is not None
                self.runs.deduplicate(execution, decision.duplicate_of)
            else:
                self.runs.admit(execution)
        self.pump()

    # -- the results consumer --------------------------------------------------------

    def _ensure_results(self) -> None:
        if self._results is None and not self._results_starting and not self._letting_go:
            self._results_starting = True
            self.spawn(self._start_results())

    async def _start_results(self) -> None:
        token = self._results_token = _Token()
        # Markers stay unacked while their executions run, and orphans while
        # settled: the window must hold all of them and leave room for results.
        prefetch = min(2 * self.window + 64, 65535)
        try:
            consumer = await self.links.pool.consume(
                self.results_name,
                prefetch=prefetch,
                on_message=lambda delivery: self._on_result(delivery, token),
                on_cancelled=self._on_gone,
            )
        except CHANNEL_GONE as exc:
            self.links.fail(exc)
            return
        finally:
            self._results_starting = False
        if not token.live or self._letting_go or self._stopped:
            await self.links.pool.cancel(consumer)
            return
        self._results = consumer

    def _on_result(self, delivery: Delivery, token: _Token) -> None:
        self.links.activity()
        if not token.live or self._stopped:
            self.spawn(delivery.nack(requeue=True))
            return
        self.results.handle(delivery)
        self.pump()

    async def poison(self, delivery: Delivery, source: str, reason: str) -> None:
        """Keep it once in the dead-letter queue, then drop it: it never loops."""
        log.warning("%s: dead-lettering a message: %s", source, reason[:200])
        try:
            await dead_letter(
                self.links.publisher, delivery.body, source_queue=source, reason=reason
            )
        except BrokerError as exc:
            self.links.fail(exc)
            return
        await delivery.ack()

    # -- letting go, to consume again with a larger window ---------------------------

    def _maybe_reconsume(self) -> None:
        if (
            self._reconsume_wanted
            and not self._letting_go
            and not self._stopped
            and self.gate.used == 0
        ):
            self._letting_go = True
            self.gate.admitting = False
            self.spawn(self._reconsume())

    async def _reconsume(self) -> None:
        # Never while we hold an admitted execution: a standby would take the
        # queue over and admit up to the limit beside ours.
        log.info("%s: consuming again for a larger window", self.name)
        try:
            await self._let_go()
            self.window = self.settings.window_for(self.gate.limit)
            self._reconsume_wanted = False
            self._letting_go = False
            self.gate.admitting = not self._draining
            if not self._stopped:
                await self._consume()
        except CHANNEL_GONE as exc:
            self.links.fail(exc)

    async def _let_go(self) -> None:
        # Results first: once we stop consuming submissions another owner may
        # start, and its markers and results must not reach us.
        results, self._results = self._results, None
        self._results_token.live = False
        if results is not None:
            await self.links.pool.cancel(results)
        for orphan in self.gate.orphans.values():
            if orphan.timer is not None:
                orphan.timer.cancel()
            await orphan.marker.nack(requeue=True)
            if orphan.result is not None:
                await orphan.result[0].nack(requeue=True)
        self.gate.orphans.clear()
        submissions, self._submissions = self._submissions, None
        self._submissions_token.live = False
        if submissions is not None:
            await self.links.pool.cancel(submissions)
        for execution in self.gate.take_all_pending():
            await execution.submission.nack(requeue=True)
        self._set_busy(self.gate.busy)

    # -- plumbing --------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: background task failed", self.name, exc_info=exc)

    def _set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.links.busy_changed(busy)

    async def wait_tasks(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
