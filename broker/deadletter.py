"""Poison messages: kept once in ``polos.dead`` with the reason, never requeued.

Like dramatiq's ``DecodeError`` path: the raw bytes are kept, so an operator
can see exactly what arrived and why it was refused.
"""

from __future__ import annotations

import uuid

from broker.publisher import ConfirmedPublisher
from schemas.topology import DEAD_LETTER_QUEUE

REASON_HEADER = "x-polos-reason"
SOURCE_HEADER = "x-polos-source-queue"


async def dead_letter(
    publisher: ConfirmedPublisher,
    body: bytes,
    *,
    source_queue: str,
    reason: str,
    message_id: str | None = None,
) -> None:
    """Store ``body`` in the dead-letter queue with why; ack the original only after this."""
    await publisher.publish(
        DEAD_LETTER_QUEUE,
        body,
        message_id=message_id or uuid.uuid4().hex,
        headers={REASON_HEADER: reason[:1000], SOURCE_HEADER: source_queue},
    )
