"""Following an execution over server-sent events: what both event streams share.

``GET /api/v1/executions/{id}/events`` (gateway/executions.py) and Polos's
``GET /api/v1/events/stream`` (gateway/run_events.py) differ in what they send;
how they send it is here: the response's headers, a client that leaves, and the
keep-alive comments while nothing happens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.watch import END, Item, Subscription

_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_KEEPALIVE = b": keep-alive\n\n"


class Follow:
    """One open stream: writes to it, and what its subscription hears, in between
    keep-alives, until the subscription ends or the client leaves."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        subscription: Subscription,
        keepalive_seconds: float,
    ) -> None:
        self._request = request
        self._response = response
        self.subscription = subscription
        self._keepalive = keepalive_seconds
        self._loop = asyncio.get_running_loop()
        self._idle_since = self._loop.time()

    async def write(self, chunk: bytes) -> None:
        await self._response.write(chunk)
        self._idle_since = self._loop.time()

    async def next(self) -> Item | None:
        """The next event or RESYNC the subscription hears; None once it ends (END) or
        the client has left."""
        # A client that leaves is noticed within this (aiohttp does not cancel us).
        poll = min(self._keepalive, 1.0)
        while True:
            try:
                async with asyncio.timeout(poll):
                    item = await self.subscription.inbox.get()
            except TimeoutError:
                transport = self._request.transport
                if transport is None or transport.is_closing():
                    return None
                if self._loop.time() - self._idle_since >= self._keepalive:
                    await self.write(_KEEPALIVE)
                continue
            return None if item is END else item


async def respond(
    request: web.Request,
    subscription: Subscription,
    keepalive_seconds: float,
    stream: Callable[[Follow], Awaitable[None]],
) -> web.StreamResponse:
    """An event stream whose body ``stream`` writes; a client gone mid-write ends it."""
    response = web.StreamResponse(headers=_HEADERS)
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await stream(Follow(request, response, subscription, keepalive_seconds))
    return response
