"""Reading AMQP frames: the ones every message brings, decoded directly.

aiormq reads each frame with three awaits into a ``BytesIO`` under a lock and
hands it to pamqp, whose decoding walks every attribute of the frame class by
name and type and validates the result: about 30 µs per delivery on this
machine (the Basic.Deliver, its content header and its body), and aiormq's
reader was the largest item of the dispatcher's and the worker's profiles
after the socket writes (18 %; pamqp's ``unmarshal`` alone 10 %).

``FrameReader`` cuts frames out of what the socket delivered, in chunks, and
decodes what every message costs directly with ``struct``: Basic.Deliver,
Basic.Ack (publisher confirms), content headers (every property, in pamqp's
types) and bodies. It returns the same pamqp objects with the same values, so
aiormq cannot tell; every other frame (connection and channel methods,
heartbeats, Basic.Nack/Return/Cancel ...) goes to pamqp as before. Errors map
to aiormq's own exceptions as its reader maps them.

``install()`` makes aiormq use it for every connection this process opens
(aiormq looks ``FrameReceiver`` up when it connects); it does nothing when the
installed aiormq does not look as expected, and then aiormq reads as it always
did. Like ``broker.confirms``, this leans on aiormq's internals by design,
checked, in one module.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands, decode
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_IDS = struct.Struct(">HH")  # class id, method id
_TAG = struct.Struct(">q")  # signed, as pamqp decodes a longlong
_HEADER = struct.Struct(">HHQH")  # class id, weight, body size, first property flags
_SHORT = struct.Struct(">H")
_FRAME_END = 0xCE
_CHUNK = 1 << 16  # at most this much taken from the socket's reader at a time
_METHOD, _CONTENT_HEADER, _BODY = 1, 2, 3
_DELIVER, _ACK = (60, 60), (60, 80)

_WIRE_ORDER = [
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
]
# Basic.Properties in wire order: (attribute, flag bit, decoder), decoders as pamqp's.
_PROPERTIES = tuple(
    (name, commands.Basic.Properties.flags[name], getattr(commands.Basic.Properties, "_" + name))
    for name in commands.Basic.Properties.__slots__
)


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    end = offset + 1 + length
    if end > len(data):
        raise ValueError("short string truncated")
    return data[offset + 1 : end].decode("utf-8"), end


def _deliver(payload: bytes) -> commands.Basic.Deliver:
    consumer_tag, at = _short_str(payload, 4)
    (delivery_tag,) = _TAG.unpack_from(payload, at)
    redelivered = bool(payload[at + 8] & 1)
    exchange, at = _short_str(payload, at + 9)
    routing_key, at = _short_str(payload, at)
    # Built without __init__: its validate() checks what the broker sent us.
    frame = commands.Basic.Deliver.__new__(commands.Basic.Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = redelivered
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _ack(payload: bytes) -> commands.Basic.Ack:
    (delivery_tag,) = _TAG.unpack_from(payload, 4)
    frame = commands.Basic.Ack.__new__(commands.Basic.Ack)
    frame.delivery_tag = delivery_tag
    frame.multiple = bool(payload[12] & 1)
    return frame


def _content_header(payload: bytes, end: int) -> ContentHeader:
    class_id, weight, body_size, flags = _HEADER.unpack_from(payload, 0)
    at = 14
    extra = flags
    while extra & 1:  # more flag words follow (none are defined in 0-9-1)
        (extra,) = _SHORT.unpack_from(payload, at)
        at += 2
    properties = commands.Basic.Properties.__new__(commands.Basic.Properties)
    for name, bit, kind in _PROPERTIES:
        if not flags & bit:
            setattr(properties, name, None)
        elif kind == "shortstr":
            text, at = _short_str(payload, at)
            setattr(properties, name, text)
        elif kind == "octet":
            setattr(properties, name, payload[at])
            at += 1
        else:  # table, timestamp: pamqp's decoders, as pamqp decodes them
            consumed, decoded = decode.by_type(payload[at:end], kind)
            setattr(properties, name, decoded)
            at += consumed
    if at > end:
        raise ValueError("content header truncated")
    if properties.cluster_id is None:
        properties.cluster_id = ""  # as pamqp's Properties() leaves it
    header = ContentHeader(weight, body_size, properties)
    header.class_id = class_id
    return header


def decode_frame(head: bytes, payload: bytes) -> tuple[int, int, Any]:
    """One frame from its 7-byte head and the rest (payload + frame end), as
    ``pamqp.frame.unmarshal`` returns it: (bytes, channel, frame)."""
    kind, channel, size = _HEAD.unpack(head)
    if len(payload) != size + 1 or payload[size] != _FRAME_END:
        return pamqp.frame.unmarshal(head + payload)  # pamqp says what is wrong
    try:
        if kind == _BODY:
            return size + 8, channel, ContentBody(payload[:size])
        if kind == _METHOD and size >= 4:
            ids = _IDS.unpack_from(payload, 0)
            if ids == _DELIVER:
                return size + 8, channel, _deliver(payload)
            if ids == _ACK and size == 13:
                return size + 8, channel, _ack(payload)
        elif kind == _CONTENT_HEADER and size >= 14:
            return size + 8, channel, _content_header(payload, size)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        pass  # malformed: pamqp raises its own error for it below
    return pamqp.frame.unmarshal(head + payload)


class FrameReader(aiormq.connection.FrameReceiver):
    """aiormq's ``FrameReceiver``: the same frames, read and decoded with less work.

    It takes what the socket delivered in chunks and cuts the frames out of its
    own buffer: ``StreamReader.readexactly`` deletes each read from the front of
    the reader's buffer, moving everything behind it, so reading many small
    frames from a full buffer cost more than decoding them (9 % of the
    dispatcher)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = b""
        self._at = 0

    async def _fill(self, wanted: int) -> None:
        """Until ``wanted`` bytes past the read position are buffered."""
        while len(self._buffer) - self._at < wanted:
            chunk = await self.reader.read(_CHUNK)
            if not chunk:
                raise asyncio.IncompleteReadError(self._buffer[self._at :], wanted)
            self._buffer = self._buffer[self._at :] + chunk
            self._at = 0

    async def get_frame(self) -> Any:
        if self._at == len(self._buffer) and self.reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            await self._fill(7)
            at = self._at
            head = self._buffer[at : at + 7]
            if not self.started:
                if head.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            size = _HEAD.unpack(head)[2]
            await self._fill(8 + size)
            at = self._at
            payload = self._buffer[at + 7 : at + 8 + size]
            self._at = at + 8 + size
        except asyncio.IncompleteReadError as e:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(e.partial)} bytes but {e.expected} bytes expected",
            ) from e
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        try:
            return decode_frame(head, payload)
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e


def _looks_as_expected() -> bool:
    receiver = getattr(aiormq.connection, "FrameReceiver", None)
    return (
        isinstance(receiver, type)
        and hasattr(receiver, "get_frame")
        and list(commands.Basic.Properties.__slots__) == _WIRE_ORDER
    )


_installed = False


def install() -> bool:
    """aiormq reads every connection opened from now on with ``FrameReader``;
    False (and aiormq's own reader) when aiormq does not look as expected."""
    global _installed
    if _installed:
        return True
    if not _looks_as_expected():
        log.warning("aiormq's frame reader is not what broker.frame_reader expects: not used")
        return False
    aiormq.connection.FrameReceiver = FrameReader  # type: ignore[misc]
    _installed = True
    return True
