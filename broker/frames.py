"""The AMQP 0-9-1 frames of one publish, as bytes for aiormq's writer.

Both of our batching writers (``broker.confirms`` for confirmed publishes,
the gateway's announcer for fire-and-forget events) hand aiormq a run of
ready-made frames instead of calling ``basic_publish``, so they need the
frames of a message as bytes. pamqp marshals them by walking each class's
fields and validating every value: about 9 µs for the three frames of a
submission-sized message on the 2-core machine (5.5 µs the Basic.Publish,
4 µs the content header with its ``Basic.Properties``, 1 µs the body). The
fixed shape we publish is laid out here directly instead, for about 1.5 µs
(``tests/test_broker_frames.py`` checks it byte for byte against pamqp).

Every frame is ``type (1) | channel (2) | payload size (4) | payload | 0xCE``,
integers big-endian, a shortstr one length byte and that many UTF-8 bytes:

    method   type 1: class 60, method 40 (Basic.Publish) (2+2) | ticket 0 (2)
             | exchange shortstr | routing key shortstr | bits: 1 = mandatory
    header   type 2: class 60 (2) | weight 0 (2) | body size (8)
             | property flags (2): content-type 0x8000, delivery-mode 0x1000,
               message-id 0x0080, in that order in the properties that follow
             | content-type shortstr | delivery-mode (1) | message-id shortstr
    body     type 3: up to ``max_content_size`` bytes of the body; as many
             frames as it takes, none for an empty body (as aiormq splits it)

A message with headers keeps the hand-made method and body frames and gets
its content header from pamqp (a field table has many value types; not worth
a second encoder). Whatever the hand layout does not cover (a string over 255
bytes, an exchange name pamqp rejects, an empty message id or content type)
goes wholly through pamqp, which raises the ``TypeError``/``ValueError`` it
always did for what cannot be sent.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from typing import Any, cast

import pamqp.frame
from aiormq import spec
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.constants import DOMAIN_REGEX
from pamqp.header import ContentHeader

PERSISTENT = 2
TRANSIENT = 1

_BASIC = 60
_PUBLISH = 40
_FRAME_END = b"\xce"
_BODY_HEAD = struct.Struct(">BHI")  # frame type 3, channel, size
_METHOD_HEAD = struct.Struct(">BHIHHH")  # frame type 1, channel, size, class, method, ticket
# Frame type 2, channel, size, class, weight, body size, property flags.
_HEADER_HEAD = struct.Struct(">BHIHHQH")
_HEADER_FLAGS = 0x8000 | 0x1000 | 0x0080  # property flags: content-type, delivery-mode, message-id
# Method payload besides the exchange shortstr and the routing key: class, method, ticket,
# the key's length byte, bits.
_METHOD_FIXED = 2 + 2 + 2 + 1 + 1
# Header payload besides the properties' strings: class, weight, body size, flags, and the
# message id's length byte.
_HEADER_FIXED = 2 + 2 + 8 + 2 + 1
_EXCHANGE_NAME = DOMAIN_REGEX["exchange-name"]


def publish_frames(
    channel_number: int,
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
    """Basic.Publish, content header and content body frames of one message, marshalled.

    ``max_content_size`` is the largest body frame payload (aiormq's
    ``Channel.max_content_size``: the negotiated frame_max less 8). Raises
    ``TypeError``/``ValueError`` (from pamqp) for what cannot be encoded, e.g.
    a routing key over 255 bytes.
    """
    key = routing_key.encode()
    mid = message_id.encode()
    fixed = _fixed_parts(exchange, mandatory, content_type, persistent)
    if fixed is None or len(key) > 255 or not 0 < len(mid) <= 255:
        return _pamqp_frames(
            channel_number,
            exchange,
            routing_key,
            body,
            _properties(message_id, persistent, content_type, headers),
            mandatory,
            max_content_size,
        )
    exchange_str, method_tail, properties = fixed
    size = len(body)
    parts = [
        _METHOD_HEAD.pack(
            1, channel_number, _METHOD_FIXED + len(exchange_str) + len(key), _BASIC, _PUBLISH, 0
        ),
        exchange_str,
        bytes((len(key),)),
        key,
        method_tail,
    ]
    if headers is None:
        parts += (
            _HEADER_HEAD.pack(
                2,
                channel_number,
                _HEADER_FIXED + len(properties) + len(mid),
                _BASIC,
                0,
                size,
                _HEADER_FLAGS,
            ),
            properties,
            bytes((len(mid),)),
            mid,
            _FRAME_END,
        )
    else:
        header = ContentHeader(0, size, _properties(message_id, persistent, content_type, headers))
        parts.append(pamqp.frame.marshal(header, channel_number))
    if size <= max_content_size:
        if size:
            parts += (_BODY_HEAD.pack(3, channel_number, size), body, _FRAME_END)
    else:
        for start in range(0, size, max_content_size):
            chunk = body[start : start + max_content_size]
            parts += (_BODY_HEAD.pack(3, channel_number, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)


@functools.lru_cache(maxsize=512)
def _fixed_parts(
    exchange: str, mandatory: bool, content_type: str, persistent: bool
) -> tuple[bytes, bytes, bytes] | None:
    """(exchange shortstr, bits + frame end, content-type shortstr + delivery mode), or None
    where pamqp must decide (it validates exchange names; empty strings are left out)."""
    name = exchange.encode()
    kind = content_type.encode()
    if len(exchange) > 127 or not _EXCHANGE_NAME.fullmatch(exchange):
        return None
    if not 0 < len(kind) <= 255:
        return None
    mode = PERSISTENT if persistent else TRANSIENT
    return (
        bytes((len(name),)) + name,
        (b"\x01" if mandatory else b"\x00") + _FRAME_END,
        bytes((len(kind),)) + kind + bytes((mode,)),
    )


def _properties(
    message_id: str, persistent: bool, content_type: str, headers: Mapping[str, Any] | None
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        message_id=message_id,
        headers=cast(FieldTable, dict(headers)) if headers is not None else None,
    )


def _pamqp_frames(
    channel_number: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: spec.Basic.Properties,
    mandatory: bool,
    max_content_size: int,
) -> bytes:
    marshal = pamqp.frame.marshal
    method = spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    parts = [
        marshal(method, channel_number),
        marshal(ContentHeader(0, len(body), properties), channel_number),
    ]
    for start in range(0, len(body), max_content_size):
        chunk = ContentBody(body[start : start + max_content_size])
        parts.append(marshal(chunk, channel_number))
    return b"".join(parts)
