"""Telling the world: lifecycle events on ``polos.events``, cancels on ``polos.cancel``.

Events go out many to a message (``schemas.dispatch.EventBatch``): each
``event()`` joins the open batch of its project, and the batches are published
once per flush: ``linger`` seconds after the first event (the next event-loop
round if 0), or as soon as one holds ``max_events`` events or ``max_bytes``
bytes. A batch is one quorum enqueue for the recorder, however
many events it carries. ``event()`` returns once the batch carrying its event
is confirmed, so what the caller does next (acknowledge a delivery) follows
the event as before.

An event the broker does not take (after a few tries for a nack) raises
``BrokerError`` to every caller whose event was in the batch: the dispatcher
then lets go of nothing the event settles (``dispatcher/effects.py``), so no
record is left behind by a lost event. Cancels are best effort: a failed one
is logged (the run's deadline and lease still bound it). All batches of one project go through the
same channel, in order, so a follower sees an execution's events in order;
they are at-least-once (a takeover may repeat a terminal event), so followers
key them by (execution_id, status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aio_pika.abc import AbstractConnection

from broker.connection import Backoff, retry
from broker.errors import BrokerError, PublishRejected
from dispatcher.publishers import PinnedPublishers
from schemas.dispatch import (
    CancelMessage,
    ErrorInfo,
    ExecutionStatus,
    encode,
    encode_event_batch,
    encode_lifecycle_event,
)
from schemas.envelope import SubmissionEnvelope
from schemas.ids import now_rfc3339
from schemas.topology import CANCEL_EXCHANGE, EVENTS_EXCHANGE, event_batch_routing_key

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 1000
DEFAULT_MAX_BYTES = 1 << 20
# A nacked batch of events is tried this often, waits between them up to this long.
EVENT_ATTEMPTS = 5
EVENT_RETRY_MAX_SECONDS = 1.0


class EventsNotPublished(BrokerError):
    """A batch of lifecycle events the broker did not take."""


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Batch:
    project_id: str
    done: asyncio.Future[None]
    bodies: list[bytes] = field(default_factory=list)
    size: int = 0


class Notifier:
    def __init__(
        self,
        connection: AbstractConnection,
        *,
        confirm_timeout: float,
        channels: int,
        on_event: Callable[[ExecutionStatus, SubmissionEnvelope], None] | None = None,
        linger: float = 0.0,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        # Told of every transition first (dispatcher/observe.py: metrics, spans).
        self._on_event = on_event
        self._publishers = PinnedPublishers(
            connection, confirm_timeout=confirm_timeout, channels=channels
        )
        self._confirm_timeout = confirm_timeout
        self._linger = linger
        self._max_events = max(1, max_events)
        self._max_bytes = max(1, max_bytes)
        self._open: dict[str, _Batch] = {}
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self.batches_sent = 0
        self.events_sent = 0

    async def start(self) -> None:
        await self._publishers.start()

    async def close(self) -> None:
        """Publish what is open, wait (up to the confirm timeout) for what is in flight."""
        self._flush()
        if self._sending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._confirm_timeout):
                    await asyncio.gather(*self._sending, return_exceptions=True)
        await self._publishers.close()

    async def event(
        self, status: ExecutionStatus, envelope: SubmissionEnvelope, **fields: Any
    ) -> None:
        """Publish one transition; returns once its batch is confirmed (see ``post``).

        Raises ``BrokerError`` if the broker did not take the batch."""
        done = self.post(status, envelope, **fields)
        if done is not None:
            # Shielded: a caller cancelled while waiting must not cancel the batch of others.
            await asyncio.shield(done)

    def post(
        self,
        status: ExecutionStatus,
        envelope: SubmissionEnvelope,
        *,
        dispatch_id: str | None = None,
        worker_id: str | None = None,
        duplicate_of: str | None = None,
        result: Any = None,
        error: ErrorInfo | None = None,
        with_submission: bool = False,
        submission_raw: bytes | None = None,
        cancelled_by: str | None = None,
        at: str | None = None,
        started_at: str | None = None,
        attempt: int = 0,
        retry_count: int = 0,
        retry_at: str | None = None,
    ) -> asyncio.Future[None] | None:
        """Add one transition to its project's open batch, without waiting: the
        future (shared by the batch; never cancel it) is settled when the broker
        confirmed the batch, or fails with ``BrokerError`` if it did not take it.
        None for an event that cannot even be encoded (logged; best effort).
        ``submission_raw``: the envelope as published, embedded as it is when
        ``with_submission``. No task or future per event: a flush's events are a
        few batches, awaited as such."""
        if self._on_event is not None:
            self._on_event(status, envelope)
        try:
            body = encode_lifecycle_event(
                status,
                envelope,
                at=at or now_rfc3339(),
                submission_raw=submission_raw,
                with_submission=with_submission,
                dispatch_id=dispatch_id,
                worker_id=worker_id,
                duplicate_of=duplicate_of,
                result=result,
                error=error,
                cancelled_by=cancelled_by,
                started_at=started_at,
                attempt=attempt,
                retry_count=retry_count,
                retry_at=retry_at,
            )
        except Exception:
            # Best effort all the same: an event that cannot even be encoded must
            # not keep the settlement that follows it from acknowledging.
            log.exception("lifecycle event %s of %s not published", status, envelope.execution_id)
            return None
        return self._add(envelope.project_id, body)

    def _add(self, project_id: str, body: bytes) -> asyncio.Future[None]:
        batch = self._open.get(project_id)
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._open[project_id] = _Batch(project_id, loop.create_future())
            if not self._flush_scheduled:
                self._flush_scheduled = True
                if self._linger > 0:
                    loop.call_later(self._linger, self._flush)
                else:
                    loop.call_soon(self._flush)
        batch.bodies.append(body)
        batch.size += len(body)
        done = batch.done
        if len(batch.bodies) >= self._max_events or batch.size >= self._max_bytes:
            self._send(self._open.pop(project_id))
        return done

    def _flush(self) -> None:
        self._flush_scheduled = False
        batches, self._open = self._open, {}
        for batch in batches.values():
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        # Tasks start in creation order, so a project's batches reach its channel in order.
        task = asyncio.get_running_loop().create_task(self._publish(batch), name="events")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, batch: _Batch) -> None:
        message_id = uuid.uuid4().hex
        # Callers that stopped waiting must not leave an exception never retrieved.
        batch.done.add_done_callback(_retrieve)
        failure: BrokerError = EventsNotPublished(
            "the dispatcher stopped before the broker took them"
        )
        sent = False
        try:
            publisher = self._publishers.pick(batch.project_id)
            body = encode_event_batch(batch.bodies)
            # A nack here is a queue without a leader for a moment (a node was
            # lost), not a full one: the recorders' queue has no length limit.
            await retry(
                lambda: publisher.publish(
                    event_batch_routing_key(batch.project_id),
                    body,
                    message_id=message_id,
                    exchange=EVENTS_EXCHANGE,
                    mandatory=False,
                ),
                what="lifecycle events",
                backoff=Backoff(EVENT_RETRY_MAX_SECONDS),
                retry_on=lambda exc: isinstance(exc, PublishRejected),
                attempts=EVENT_ATTEMPTS,
            )
        except BrokerError as exc:
            log.warning(
                "%d lifecycle events of %s not published: %s",
                len(batch.bodies),
                batch.project_id,
                exc,
            )
            failure = exc
        except Exception as exc:
            log.exception(
                "%d lifecycle events of %s not published", len(batch.bodies), batch.project_id
            )
            failure = EventsNotPublished(f"{type(exc).__name__}: {exc}")
        else:
            sent = True
            self.batches_sent += 1
            self.events_sent += len(batch.bodies)
        finally:
            if not batch.done.done():
                if sent:
                    batch.done.set_result(None)
                else:
                    batch.done.set_exception(failure)

    async def cancel(
        self,
        execution_id: str,
        work_queue: str,
        reason: Literal["timeout", "user", "superseded"],
        *,
        dispatch_id: str | None = None,
        worker_id: str | None = None,
    ) -> None:
        """Tell the workers of ``work_queue`` to stop ``execution_id`` (only that
        dispatch, or only that worker's copy, when given)."""
        message = CancelMessage(
            execution_id=execution_id,
            reason=reason,
            at=now_rfc3339(),
            dispatch_id=dispatch_id,
            worker_id=worker_id,
        )
        try:
            await self._publishers.pick(execution_id).publish(
                work_queue,
                encode(message),
                message_id=uuid.uuid4().hex,
                persistent=False,
                exchange=CANCEL_EXCHANGE,
                mandatory=False,
            )
        except BrokerError as exc:
            log.warning("cancel of %s not published: %s", execution_id, exc)
        except Exception:
            log.exception("cancel of %s not published", execution_id)
