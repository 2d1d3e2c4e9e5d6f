"""A request's body, read within its limits: JSON, uncompressed, at most
``POLOS_MAX_BODY_BYTES``, arrived within ``POLOS_BODY_TIMEOUT_SECONDS`` of its headers.

Compressed bodies are refused (415 ``UNSUPPORTED_CONTENT_ENCODING``), never
inflated: a ``Content-Encoding`` other than identity, or a transfer coding other
than chunked. aiohttp inflates ``gzip``/``deflate`` on the event loop as the bytes
arrive (a 1 MB body inflating to 1 GiB held every other client for seconds),
answers a corrupt one 500 and takes an unknown coding for plain bytes; our
bodies are small JSON and no client of the API compresses them. So the server
never inflates (``auto_decompress=False``, gateway/server.py) and every route
that reads a body reads it here. A body whose framing breaks half-way (a bad
chunk) is a 400, not a 500; one that stalls is a 408, and its connection is
closed as soon as that is sent (under aiohttp's own runners, once its lingering
read of the rest gives up: ``lingering_time``, 10 s).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import errors
from gateway.context import APP_BODY_READS
from gateway.errors import ApiError
from gateway.server import GatewayProtocol
from gateway.settings import Settings

JSON = "application/json"
_IDENTITY = ("", "identity")


async def read_json_body(request: web.Request, settings: Settings) -> bytes:
    if request.content_type != JSON:
        raise errors.UNSUPPORTED_MEDIA_TYPE("Content-Type must be application/json.")
    if request.headers.get("Content-Encoding", "").strip().lower() not in _IDENTITY:
        raise errors.UNSUPPORTED_CONTENT_ENCODING(
            "Compressed bodies are not accepted: send the body without Content-Encoding.",
            [{"field": "Content-Encoding", "message": "only identity is accepted"}],
        )
    coding = request.headers.get("Transfer-Encoding")
    if coding is not None and coding.replace(" ", "").lower() != "chunked":
        # aiohttp frames "gzip, chunked" as chunked and hands on the coded bytes.
        raise errors.UNSUPPORTED_CONTENT_ENCODING(
            "Transfer codings other than chunked are not accepted.",
            [{"field": "Transfer-Encoding", "message": "only chunked is accepted"}],
        )
    limit = settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        if request.content.is_eof():
            # The whole body came with the head (almost every submit): nothing can
            # stall, so no timer is armed and no read is tracked for shutdown.
            return await request.read()
        async with asyncio.timeout(settings.body_timeout_seconds):
            return await request.app[APP_BODY_READS].read(request)
    except TimeoutError:
        if isinstance(request.protocol, GatewayProtocol):
            request.protocol.close_after_answer()
        raise errors.REQUEST_TIMEOUT(
            f"The request body did not arrive within {settings.body_timeout_seconds:g} s."
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except (web.RequestPayloadError, HttpProcessingError):
        raise errors.BAD_HTTP_REQUEST(
            "The body's framing (chunk sizes or Content-Length) is malformed."
        ) from None


def _too_large(limit: int) -> ApiError:
    return errors.PAYLOAD_TOO_LARGE(f"The request body exceeds the limit of {limit} bytes.")
