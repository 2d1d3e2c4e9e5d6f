"""The HTTP server: aiohttp's, with the bounds a hostile client meets before any handler.

aiohttp bounds the request line and each header field (8 KiB) and the number
of fields (128), so an unfinished head may hold 1 MiB per connection (1,000
connections took a gateway from 60 MiB to 1.6 GiB); a head that trickles in
holds its connection until the keep-alive timeout; connections are not
counted; and the 400s its parser answers are text/plain quoting the bytes it
refused, which may be the API key. Here, per connection (``GatewayProtocol``):

- the head (request line and fields) is bounded in all (``max_header_bytes``:
  431), besides aiohttp's per-line and count bounds, and must arrive within
  ``header_timeout_seconds`` of its first byte (408);
- every error is the JSON of gateway/errors.py and repeats nothing it got, also
  those aiohttp answers itself before any middleware (an unknown ``Expect``: 417);

and per listening socket (``Doorman``): at most ``max_connections`` open. At
the limit a new connection takes the place of the one that has waited longest
for a request (idle, or its head still arriving); when every connection has a
request in progress, the new one is answered 503. Once a burst of connections
is over, the memory they held goes back to the system (gateway/memory.py).
Bodies are bounded in size and time where they are read (gateway/request_body.py).

``serving`` runs an app this way (``python -m gateway``, and tests that need
these bounds); aiohttp's own runners (``run_app``, the test client) serve the
same app without them, with the handler arguments of ``handler_args``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from itertools import chain
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    ContentLengthError,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from gateway import errors
from gateway.errors import ApiError, render
from gateway.memory import Trim
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Room kept below the open-files limit for the broker, Redis and files.
_RESERVED_FILES = 128


def handler_args(settings: Settings) -> dict[str, Any]:
    """What every connection's aiohttp request handler is built with."""
    return {
        "max_line_size": settings.max_header_line_bytes,
        "max_field_size": settings.max_header_line_bytes,
        "max_headers": settings.max_header_count,
        "keepalive_timeout": settings.keepalive_timeout_seconds,
        # Content-Encoding is refused where a body is read (request_body.py), never inflated.
        "auto_decompress": False,
    }


def connection_limit(settings: Settings) -> int:
    if settings.max_connections is not None:
        return settings.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(64, soft - _RESERVED_FILES)


# Headers that say who is asking and what the request means: a second copy would make
# it ambiguous which one counts (a proxy's or the client's), so it is refused.
SINGLE_HEADERS = ("Authorization", "Cookie", "X-Project-ID", "Idempotency-Key")


def head_check(settings: Settings) -> Callable[[web.Request], None]:
    """What every head must meet before its handler, run by ``errors.error_middleware``:

    - ``max_header_bytes``, for a head that arrived whole (one that is still
      arriving is measured by ``GatewayProtocol``), under aiohttp's own runners too;
    - at most one of each of ``SINGLE_HEADERS``, and of each query parameter (no
      route takes a list there: of two, which one counts would be a guess).
    """
    limit = settings.max_header_bytes

    def check(request: web.Request) -> None:
        raw = request.raw_headers
        # "GET / HTTP/1.1\r\n", "name: value\r\n" per field (summed in C), "\r\n":
        # the bytes GatewayProtocol counts.
        size = len(request.method) + len(request.raw_path) + 14 + 4 * len(raw)
        if size + sum(map(len, chain.from_iterable(raw))) > limit:
            raise errors.HEADERS_TOO_LARGE(f"The request's headers exceed {limit} bytes.")
        headers = request.headers
        for name in SINGLE_HEADERS:
            if name in headers and len(headers.getall(name)) > 1:
                raise errors.BAD_HTTP_REQUEST(
                    f"The {name} header is sent more than once.",
                    [{"field": name, "message": "sent more than once"}],
                )
        query = request.query if request.query_string else None
        if query and len(query) != len(query.keys()):  # keys() holds each name once
            repeated = sorted(n for n in set(query) if len(query.getall(n)) > 1)
            raise errors.VALIDATION_ERROR(
                f"Invalid query parameter(s): {', '.join(repeated)}.",
                [{"field": n, "message": "given more than once"} for n in repeated],
            )

    return check


class Doorman:
    """The open connections of one listening socket, at most ``limit``.

    Those waiting for a request (idle, or their head still arriving) are kept in
    the order they began to wait, so the longest-waiting one is the first to go.
    """

    def __init__(self, limit: int, trim: Trim | None = None) -> None:
        self.limit = limit
        self._open: set[GatewayProtocol] = set()
        self._waiting: dict[GatewayProtocol, None] = {}  # oldest first
        self._trim = trim or Trim()

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, connection: GatewayProtocol) -> bool:
        """Whether it may stay; at the limit the longest-waiting one makes room."""
        if len(self._open) >= self.limit:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                return False
            self.leave(oldest)
            oldest.make_room()
        self._open.add(connection)
        self._waiting[connection] = None
        self._trim.opened()
        return True

    def waits(self, connection: GatewayProtocol) -> None:
        if connection in self._open:
            self._waiting.pop(connection, None)
            self._waiting[connection] = None

    def works(self, connection: GatewayProtocol) -> None:
        self._waiting.pop(connection, None)

    def leave(self, connection: GatewayProtocol) -> None:
        self._waiting.pop(connection, None)
        if connection in self._open:
            self._open.remove(connection)
            self._trim.closed()


class GatewayProtocol(web.RequestHandler):
    """aiohttp's request handler for one connection, with the bounds of its head."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        doorman: Doorman,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._settings = settings
        self._doorman = doorman
        self._head_bytes = 0  # of the head now arriving
        self._line_bytes = 0  # of its request line
        self._tail = b""  # its last bytes, for an end of head split across reads
        self._line_ended = False
        self._head_timer: asyncio.TimerHandle | None = None
        # Heads parsed (aiohttp's count) against answers finished: equal while
        # the connection waits for a request.
        self._finished = 0
        self._close_after_answer = False
        self._draining: StreamReader | None = None  # an answered request's unread body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._doorman.admit(self):
            self.refuse(
                errors.TOO_MANY_CONNECTIONS(
                    "The gateway is at its connection limit; retry on another connection."
                )
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._doorman.leave(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining is not None and self._draining.is_eof():
            self._draining = None
        # Not while aiohttp drains the body of an answered request (lingering read).
        waiting = self._request_count == self._finished and self._draining is None
        if waiting and data and not self._force_close:
            if not self._head_bytes:
                self._line_bytes, self._line_ended, self._tail = 0, False, b""
            if self._head_ends_too_late(data):
                limit = self._settings.max_header_bytes
                self.refuse(
                    errors.HEADERS_TOO_LARGE(f"The request's headers exceed {limit} bytes.")
                )
                return
            self._head_bytes += len(data)
            if not self._line_ended:
                end = data.find(b"\n")
                self._line_ended = end >= 0
                self._line_bytes += end if self._line_ended else len(data)
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            # A head was parsed (or refused: aiohttp queues the refusal as a message).
            self._head_bytes = 0
            self._cancel_head_timer()
            self._doorman.works(self)
            self._fail_broken_body(waiting)
        elif self._head_bytes and self._head_timer is None and not self._force_close:
            # The head did not arrive whole: its time runs from this, its first read
            # (a head that arrives in one read, as almost all do, never arms a timer).
            self._head_timer = self._loop.call_later(
                self._settings.header_timeout_seconds, self._head_too_slow
            )

    def _head_ends_too_late(self, data: bytes) -> bool:
        """Whether the head cannot end within ``max_header_bytes``: judged before the
        parser sees the excess, so an oversized head costs a search, not a parse."""
        room = max(0, self._settings.max_header_bytes - self._head_bytes)
        window = self._tail + data[:room] if len(data) > room else b""
        # The last bytes, for an end of head split across reads (no copy of the rest).
        self._tail = data[-3:] if len(data) >= 3 else (self._tail + data)[-3:]
        if len(data) <= room:  # almost every read: the whole head fits
            return False
        # Empty lines before a request line are allowed (RFC 9112 2.2); they end nothing.
        start = len(window) - len(window.lstrip(b"\r\n")) if not self._head_bytes else 0
        return window.find(b"\r\n\r\n", start) < 0

    def _fail_broken_body(self, waiting: bool) -> None:
        """A message parsed while a body was still arriving can only be aiohttp's refusal
        of the rest (a bad chunk): that body will never end, so its read fails now
        (400) instead of at the body timeout."""
        request = self._current_request
        if not waiting and request is not None and not request.content.is_eof():
            request.content.set_exception(web.RequestPayloadError("malformed body framing"))

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            # aiohttp answered before the app's middleware could (an Expect it does not
            # know: 417, quoting the header): the one JSON shape instead, quoting nothing.
            error = errors.from_http_exception(resp)
            resp = errors.error_response(error, self._settings.retry_after_seconds)
        done = await super().finish_response(request, resp, start_time)
        self._finished += 1
        if not request.content.is_eof():
            self._draining = request.content
        if self._close_after_answer:
            self.force_close()  # without aiohttp's lingering read of what is left
        elif self._finished == self._request_count:
            self._doorman.waits(self)
        return done

    def close_after_answer(self) -> None:
        """The body stalled: close as soon as the answer is out."""
        self._close_after_answer = True

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's parser refused the request (or, 500, a bug escaped the app)."""
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already on its way; cannot send another")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            error = errors.INTERNAL_ERROR("Internal server error.")
        else:
            # The exception's text quotes what was refused (a header may hold the key).
            log.info("refused a request from %s: %s", request.remote, type(exc).__name__)
            error = self._refusal(exc)
        status, headers, body = render(error, self._settings.retry_after_seconds)
        response = web.Response(status=status, body=body, headers=headers)
        response.force_close()
        return response

    def _refusal(self, exc: BaseException | None) -> ApiError:
        limit = self._settings.max_header_line_bytes
        if isinstance(exc, LineTooLong):
            if self._line_bytes > limit:
                return errors.URI_TOO_LONG(f"The request line exceeds {limit} bytes.")
            return errors.HEADERS_TOO_LARGE(f"A header field exceeds {limit} bytes.")
        if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
            count = self._settings.max_header_count
            return errors.HEADERS_TOO_LARGE(f"More than {count} header fields.")
        if isinstance(exc, TransferEncodingError | ContentLengthError):
            return errors.BAD_HTTP_REQUEST(
                "The body's framing (Transfer-Encoding, chunk sizes or Content-Length) is "
                "malformed."
            )
        if isinstance(exc, BadStatusLine | InvalidURLError):
            return errors.BAD_HTTP_REQUEST("The request line is malformed.")
        return errors.BAD_HTTP_REQUEST("The request's headers are malformed.")

    def refuse(self, error: ApiError) -> None:
        """Answer before any request was read, and close."""
        transport = self.transport
        if transport is None:
            return
        status, headers, body = render(error, self._settings.retry_after_seconds)
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        transport.write("\r\n".join(head).encode() + body)
        self._cancel_head_timer()
        self.force_close()

    def make_room(self) -> None:
        """Another connection needs this one's place (it is only waiting)."""
        self._cancel_head_timer()
        self.force_close()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._request_count == self._finished and self._head_bytes:
            seconds = self._settings.header_timeout_seconds
            self.refuse(errors.REQUEST_TIMEOUT(f"The request's headers took over {seconds:g} s."))

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class GatewaySite(web.BaseSite):
    """A TCP site whose connections are ``GatewayProtocol``s sharing one ``Doorman``."""

    def __init__(
        self, runner: web.AppRunner, settings: Settings, host: str, port: int, **kwargs: Any
    ) -> None:
        super().__init__(runner, **kwargs)
        self._app_runner = runner
        self._settings = settings
        self._host, self._port = host, port
        self.doorman = Doorman(connection_limit(settings))
        self._handler_args: Mapping[str, Any] = {**handler_args(settings), "access_log": None}
        self._listening: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._listening is not None and self._listening.sockets:
            port: int = self._listening.sockets[0].getsockname()[1]
            return port
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._app_runner.server
        assert server is not None, "the runner is set up first"

        def connection() -> GatewayProtocol:
            return GatewayProtocol(
                server,
                loop=loop,
                settings=self._settings,
                doorman=self.doorman,
                **self._handler_args,
            )

        self._listening = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._server = self._listening  # BaseSite.stop closes it


@asynccontextmanager
async def serving(
    app: web.Application, settings: Settings, *, host: str | None = None, port: int | None = None
) -> AsyncIterator[GatewaySite]:
    """Serve ``app`` until the block ends, then shut down as aiohttp does (handlers in
    flight get ``shutdown_timeout_seconds``, then the app's cleanup contexts run)."""
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_seconds)
    await runner.setup()
    try:
        site = GatewaySite(
            runner,
            settings,
            settings.host if host is None else host,
            settings.port if port is None else port,
        )
        await site.start()
        yield site
    finally:
        await runner.cleanup()


async def serve_until_signalled(app: web.Application, settings: Settings) -> None:
    """``python -m gateway``: serve until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serving(app, settings) as site:
        log.info("serving on %s, at most %d connections", site.name, site.doorman.limit)
        await stop.wait()
        log.info("shutting down")
