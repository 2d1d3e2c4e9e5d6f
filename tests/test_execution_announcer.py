"""The queued events' frames, laid out by hand, are the ones pamqp marshals; a round of
them is one batch message per project, bounded in count and size."""

from __future__ import annotations

import orjson
import pytest

from gateway.announcer import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, _messages
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


def test_a_round_is_one_message_per_project_within_the_bounds() -> None:
    round_ = [("a", b'{"n":%d}' % i) for i in range(5)] + [("b", b'{"n":9}'), ("a", b'{"n":5}')]
    messages = _messages(round_)
    assert [(key, count) for key, _, count in messages] == [("a", 6), ("b", 1)]
    decoded = orjson.loads(messages[0][1])
    assert decoded == {"type": "events", "events": [{"n": i} for i in range(6)]}

    many = [("a", b"{}")] * (MAX_BATCH_EVENTS + 1)
    assert [count for _, _, count in _messages(many)] == [MAX_BATCH_EVENTS, 1]
    big = b'{"x":"' + b"y" * (MAX_BATCH_BYTES // 2) + b'"}'
    assert [count for _, _, count in _messages([("a", big)] * 3)] == [1, 1, 1]
