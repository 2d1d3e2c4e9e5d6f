"""Process-wide runtime tuning every long-running role applies once it started."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

# The collector's first generation runs after this many allocations net of frees.
GC_THRESHOLD = 50_000

log = logging.getLogger(__name__)

T = TypeVar("T")
EventLoop = Literal["auto", "uvloop", "asyncio"]


def tune_gc() -> None:
    """Fewer garbage collector passes over the objects of work in flight.

    Handling a message allocates many containers (decoded frames and bodies,
    models, dicts to encode) that reference counting frees as soon as it is done;
    at the default threshold (700) the collector ran several times per handful of
    messages and walked everything still alive each time (in the recorder ~20 %
    of decoding and building a batch). What start-up left (modules, settings,
    connections) is frozen out of its view. Cycles are still collected, later.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def loop_factory(choice: EventLoop = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, unless told otherwise or it is not installed (``None``: asyncio's).

    Every role is a loop of small socket reads and writes (HTTP requests, AMQP
    frames, Redis replies) with little work between them, which is where
    uvloop's libuv-based loop saves most: end to end, the Python roles spent
    8-10 % less CPU per execution on it (``docs/benchmarks.md``, issue 8, sixth
    round). ``POLOS_EVENT_LOOP=asyncio`` keeps asyncio's own loop.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("POLOS_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], event_loop: EventLoop = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory`` picks."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        log.info("event loop: %s", loop_name(runner.get_loop()))
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
