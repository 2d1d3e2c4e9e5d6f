"""The queued event's frames, laid out by hand, are the ones pamqp marshals."""

from __future__ import annotations

import pytest

from gateway.announcer import _event_frames as publish_frames
from tests.test_broker_frames import pamqp_event_frames as _pamqp_frames


@pytest.mark.parametrize(
    ("routing_key", "body", "size"),
    [
        ("acme.emails.summarize.0190b6c5-2b1a-7c3d-8e4f-0123456789ab", b'{"a":1}', 131064),
        ("p.q.w.id", b"", 131064),
        ("p.q.w.id", b"x" * 1000, 300),  # several body frames
        ("p." + "q" * 200 + ".w.id", "é".encode() * 10, 131064),
    ],
)
def test_frames_match_pamqp(routing_key: str, body: bytes, size: int) -> None:
    message_id = "0190b6c5-2b1a-7c3d-8e4f-0123456789ab/queued"
    for channel in (1, 7, 2047):
        assert publish_frames(channel, routing_key, body, message_id, size) == _pamqp_frames(
            channel, routing_key, body, message_id, size
        )


def test_a_key_too_long_for_a_short_string_is_left_to_pamqp() -> None:
    with pytest.raises(TypeError, match="255"):
        publish_frames(1, "k" * 300, b"{}", "m", 131064)
