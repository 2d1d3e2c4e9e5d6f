"""Telling the world: lifecycle events on ``polos.events``, cancels on ``polos.cancel``.

Both are published with a confirm but are best effort: a failed publish is
logged and the transition it reports has happened all the same (an execution
is never held back because nobody could be told). The events of one execution
always go through the same channel, so a follower sees them in order; they are
at-least-once (a takeover may repeat a terminal event), so followers key them
by (execution_id, status).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from aio_pika.abc import AbstractConnection

from broker.connection import Backoff, retry
from broker.errors import BrokerError, PublishRejected
from dispatcher.publishers import PinnedPublishers
from schemas.dispatch import CancelMessage, ErrorInfo, ExecutionStatus, LifecycleEvent, encode
from schemas.envelope import SubmissionEnvelope
from schemas.ids import now_rfc3339
from schemas.topology import CANCEL_EXCHANGE, EVENTS_EXCHANGE, event_routing_key

log = logging.getLogger(__name__)

# A nacked lifecycle event is tried this often, waits between them up to this long.
EVENT_ATTEMPTS = 5
EVENT_RETRY_MAX_SECONDS = 1.0


class Notifier:
    def __init__(
        self, connection: AbstractConnection, *, confirm_timeout: float, channels: int
    ) -> None:
        self._publishers = PinnedPublishers(
            connection, confirm_timeout=confirm_timeout, channels=channels
        )

    async def start(self) -> None:
        await self._publishers.start()

    async def close(self) -> None:
        await self._publishers.close()

    async def event(
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
        cancelled_by: str | None = None,
        at: str | None = None,
    ) -> None:
        event = LifecycleEvent(
            status=status,
            execution_id=envelope.execution_id,
            project_id=envelope.project_id,
            workflow_id=envelope.workflow_id,
            deployment_id=envelope.deployment_id,
            queue_name=envelope.queue_name,
            concurrency_key=envelope.concurrency_key,
            at=at or now_rfc3339(),
            dispatch_id=dispatch_id,
            worker_id=worker_id,
            duplicate_of=duplicate_of,
            result=result,
            error=error,
            submission=envelope if with_submission else None,
            cancelled_by=cancelled_by,
        )
        try:
            routing_key = event_routing_key(
                envelope.project_id,
                envelope.queue_name,
                envelope.workflow_id,
                envelope.execution_id,
            )
            publisher, body = self._publishers.pick(envelope.execution_id), encode(event)
            # A nack here is a queue without a leader for a moment (a node was
            # lost), not a full one: the recorders' queue has no length limit.
            await retry(
                lambda: publisher.publish(
                    routing_key,
                    body,
                    # The same for a repeat of the transition (after a takeover), so
                    # followers can recognise it.
                    message_id=f"{envelope.execution_id}/{status.value}",
                    exchange=EVENTS_EXCHANGE,
                    mandatory=False,
                ),
                what=f"lifecycle event {status.value}",
                backoff=Backoff(EVENT_RETRY_MAX_SECONDS),
                retry_on=lambda exc: isinstance(exc, PublishRejected),
                attempts=EVENT_ATTEMPTS,
            )
        except BrokerError as exc:
            log.warning(
                "lifecycle event %s of %s not published: %s", status, envelope.execution_id, exc
            )
        except Exception:
            # Best effort all the same: an event that cannot even be encoded must
            # not keep the settlement that follows it from acknowledging.
            log.exception("lifecycle event %s of %s not published", status, envelope.execution_id)

    async def cancel(
        self, execution_id: str, work_queue: str, reason: Literal["timeout", "user"]
    ) -> None:
        """Tell the workers of ``work_queue`` to stop ``execution_id``."""
        message = CancelMessage(execution_id=execution_id, reason=reason, at=now_rfc3339())
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
