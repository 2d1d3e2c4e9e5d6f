"""Request bodies still arriving when the gateway shuts down.

On SIGTERM aiohttp stops reading every connection (``pre_shutdown``: its
protocol drops the bytes that arrive after it), then waits up to the shutdown
timeout for the handlers in progress. A handler still waiting for the rest of
its body can therefore never finish: it held the process for the whole timeout
(30 s by default) and was cancelled in the end all the same. ``BodyReads``
knows which handlers are reading a body; when shutdown starts it cancels those
whose body has not fully arrived, so their clients see the connection close at
once (nothing was accepted) and the process exits as soon as the others, which
have their body, have published and answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class BodyReads:
    def __init__(self) -> None:
        self._reading: dict[asyncio.Task[Any], web.Request] = {}

    async def read(self, request: web.Request) -> bytes:
        """``request.read()``, abandoned at shutdown if the body is still incomplete."""
        task = asyncio.current_task()
        if task is None or request.content.is_eof():
            return await request.read()
        self._reading[task] = request
        try:
            return await request.read()
        finally:
            self._reading.pop(task, None)

    def abandon_incomplete(self) -> int:
        """Cancel the handlers whose body will never arrive now; how many."""
        abandoned = 0
        for task, request in list(self._reading.items()):
            if not request.content.is_eof():
                task.cancel()
                abandoned += 1
        return abandoned
