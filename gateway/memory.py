"""Giving memory back to the system after a burst of connections.

What a connection holds (its head, parser buffers, read chunks) is freed when
it closes, but glibc's allocator keeps the freed pages inside its heap: after
1,000 connections with unfinished heads had gone, the gateway stayed 50 MiB
above where it started, with no more Python objects alive than before.
``malloc_trim(0)`` hands the free pages back (about 20 ms for such a heap), so
``Trim`` calls it once a burst is over: when the open connections have fallen
to half of their peak, by at least ``BURST`` connections, a second after the
last of them closed. Not glibc (musl, macOS): nothing to do.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

BURST = 256  # connections gone before a trim is worth its pause
SETTLE_SECONDS = 1.0


def _malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


class Trim:
    """Counts open connections; trims the heap once a burst of them has closed."""

    def __init__(self, trim: Callable[[], None] | None = None) -> None:
        self._trim = trim if trim is not None else _malloc_trim()
        self._open = 0
        self._peak = 0
        self._pending: asyncio.TimerHandle | None = None

    def opened(self) -> None:
        self._open += 1
        self._peak = max(self._peak, self._open)

    def closed(self) -> None:
        self._open -= 1
        if self._trim is None or self._peak - self._open < BURST or self._open > self._peak // 2:
            return
        if self._pending is not None:
            self._pending.cancel()
        self._pending = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._run)

    def _run(self) -> None:
        self._pending = None
        assert self._trim is not None
        log.info("a burst of %d connections is over: returning freed memory", self._peak)
        self._trim()
        self._peak = self._open
