"""One delivery from the recorder's queue, decoded: what to write, what to dead-letter."""

from __future__ import annotations

from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage

from schemas.dispatch import LifecycleEvent, decode_events


@dataclass(slots=True)
class Delivery:
    """One delivery, decoded: its events (with their JSON text), the items of it that did
    not decode, or why the whole message is poison."""

    message: AbstractIncomingMessage
    events: list[LifecycleEvent]
    bodies: list[bytes]
    rejected: list[tuple[bytes, str]]
    poison: str | None = None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Delivery:
        try:
            decoded = decode_events(message.body)
        except ValueError as exc:  # pydantic's ValidationError and orjson's errors too
            return cls(message, [], [], [], poison=f"undecodable lifecycle event: {exc}")
        return cls(
            message,
            [event for event, _ in decoded.events],
            [body for _, body in decoded.events],
            decoded.rejected,
        )
