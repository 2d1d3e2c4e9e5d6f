"""broker.frames lays out a publish's frames by hand: byte for byte what aiormq sends.

The reference is aiormq's own ``basic_publish`` path: its Basic.Publish and
content header marshalled by pamqp, its body split by ``Channel._split_body``,
all written by ``ChannelFrame.marshall``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import pytest
from aiormq import spec
from aiormq.abc import ChannelFrame
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from broker.frames import publish_frames
from schemas.topology import EVENTS_EXCHANGE

FRAME_MAX = 131072
SIZE = FRAME_MAX - 8  # aiormq's max_content_size at RabbitMQ's default frame_max
MESSAGE_ID = "0190b6c5-2b1a-7c3d-8e4f-0123456789ab"
CHANNELS = (1, 7, 2047, 65535)


def aiormq_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    message_id: str,
    persistent: bool = True,
    content_type: str = "application/json",
    headers: Mapping[str, Any] | None = None,
    mandatory: bool = False,
    max_content_size: int,
) -> bytes:
    """What ``aiormq.Channel.basic_publish`` writes for the same message."""
    properties = spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=2 if persistent else 1,
        message_id=message_id,
        headers=cast(FieldTable, dict(headers)) if headers is not None else None,
    )
    frames: list[Any] = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    sizer = cast(aiormq.Channel, SimpleNamespace(max_content_size=max_content_size))
    frames += aiormq.Channel._split_body(sizer, body)
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload


def pamqp_event_frames(
    channel: int, routing_key: str, body: bytes, message_id: str, max_content_size: int
) -> bytes:
    """The reference for the gateway's ``queued`` event (tests/test_execution_announcer.py)."""
    return aiormq_frames(
        channel,
        EVENTS_EXCHANGE,
        routing_key,
        body,
        message_id=message_id,
        max_content_size=max_content_size,
    )


def assert_same(channel: int, exchange: str, routing_key: str, body: bytes, **kw: Any) -> None:
    kw.setdefault("message_id", MESSAGE_ID)
    kw.setdefault("max_content_size", SIZE)
    ours = publish_frames(channel, exchange, routing_key, body, **kw)
    assert ours == aiormq_frames(channel, exchange, routing_key, body, **kw)


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"payload":{"a":1}}', id="small"),
        pytest.param(b"x" * (SIZE - 1), id="one-under-max"),
        pytest.param(b"x" * SIZE, id="exactly-max"),
        pytest.param(b"x" * (SIZE + 1), id="max-plus-one"),
        pytest.param(bytes(range(256)) * 1500, id="three-frames"),
    ],
)
def test_bodies_of_any_size_match_aiormq(channel: int, body: bytes) -> None:
    assert_same(channel, "", "polos.submit.acme.emails", body, mandatory=True)


@pytest.mark.parametrize(("length", "size"), [(1000, 300), (900, 300), (7, 1), (301, 300)])
def test_a_body_split_over_several_frames_matches_aiormq(length: int, size: int) -> None:
    body = bytes(i % 251 for i in range(length))
    assert_same(3, "", "q", body, max_content_size=size)


@pytest.mark.parametrize("mandatory", [True, False])
@pytest.mark.parametrize("exchange", ["", EVENTS_EXCHANGE, "amq.topic", "a:b@c#d,e/f+g h"])
@pytest.mark.parametrize("persistent", [True, False])
def test_exchange_mandatory_and_delivery_mode_match_aiormq(
    exchange: str, mandatory: bool, persistent: bool
) -> None:
    assert_same(1, exchange, "acme.q.wf", b"{}", mandatory=mandatory, persistent=persistent)


@pytest.mark.parametrize(
    "routing_key",
    [
        pytest.param("", id="empty"),
        pytest.param("k" * 254, id="254-bytes"),
        pytest.param("k" * 255, id="255-bytes"),
        pytest.param("é" * 127 + "k", id="unicode-255-bytes"),
        pytest.param("acme.émails.🚀.run", id="unicode"),
    ],
)
def test_routing_keys_up_to_255_bytes_match_aiormq(routing_key: str) -> None:
    assert_same(1, "", routing_key, b"{}", mandatory=True)
    assert_same(1, EVENTS_EXCHANGE, routing_key, b"{}")


@pytest.mark.parametrize(
    "message_id",
    [
        pytest.param("m", id="one-byte"),
        pytest.param("m" * 254, id="254-bytes"),
        pytest.param("m" * 255, id="255-bytes"),
        pytest.param("ü" * 127 + "m", id="unicode-255-bytes"),
        pytest.param(MESSAGE_ID + "/queued", id="event-id"),
    ],
)
def test_message_ids_up_to_255_bytes_match_aiormq(message_id: str) -> None:
    assert_same(1, "", "q", b"{}", message_id=message_id)


@pytest.mark.parametrize(
    ("routing_key", "message_id"),
    [
        pytest.param("k" * 256, MESSAGE_ID, id="key-256-bytes"),
        pytest.param("é" * 128, MESSAGE_ID, id="key-128-chars-256-bytes"),
        pytest.param("q", "m" * 256, id="id-256-bytes"),
    ],
)
def test_strings_over_255_bytes_fail_as_pamqp_fails(routing_key: str, message_id: str) -> None:
    with pytest.raises(TypeError, match="255"):
        publish_frames(1, "", routing_key, b"{}", message_id=message_id, max_content_size=SIZE)
    with pytest.raises(TypeError, match="255"):
        aiormq_frames(1, "", routing_key, b"{}", message_id=message_id, max_content_size=SIZE)


@pytest.mark.parametrize("exchange", ["bad!name", "x" * 128])
def test_an_exchange_name_pamqp_rejects_is_rejected(exchange: str) -> None:
    with pytest.raises(ValueError, match="exchange"):
        publish_frames(1, exchange, "q", b"{}", message_id="m", max_content_size=SIZE)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"x-attempt": 3}, id="int"),
        pytest.param({"x-deployment": "v42", "x-ok": True, "x-n": None}, id="mixed"),
        pytest.param({"nested": {"a": [1, "b"]}, "f": 1.5}, id="nested"),
        pytest.param({}, id="empty-table"),
    ],
)
@pytest.mark.parametrize("mandatory", [True, False])
def test_headers_go_through_pamqp_and_match_aiormq(
    headers: dict[str, Any], mandatory: bool
) -> None:
    assert_same(9, "", "polos.work.acme.v42", b"x" * 700, headers=headers, mandatory=mandatory)
    assert_same(9, "", "q", b"x" * 700, headers=headers, max_content_size=300)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "", "c" * 255])
def test_content_types_match_aiormq(content_type: str) -> None:
    assert_same(1, "", "q", b"{}", content_type=content_type)


def test_an_empty_message_id_is_left_out_as_pamqp_leaves_it_out() -> None:
    assert_same(1, "", "q", b"{}", message_id="")


def test_random_messages_match_aiormq() -> None:
    rng = random.Random(20261128)
    alphabet = "abcXYZ09._-:é€🚀"
    for _ in range(500):
        key = "".join(rng.choices(alphabet, k=rng.randint(0, 60)))
        mid = "".join(rng.choices(alphabet, k=rng.randint(1, 60)))
        body = rng.randbytes(rng.choice([0, 1, rng.randint(0, 2000)]))
        assert_same(
            rng.randint(1, 65535),
            rng.choice(["", EVENTS_EXCHANGE, "polos.cancel"]),
            key,
            body,
            message_id=mid,
            persistent=rng.random() < 0.5,
            mandatory=rng.random() < 0.5,
            headers=rng.choice([None, {"x-a": rng.randint(0, 10**6)}]),
            max_content_size=rng.choice([SIZE, rng.randint(1, 500)]),
        )
