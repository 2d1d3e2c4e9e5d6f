"""Process-wide runtime tuning every long-running role applies once it started."""

from __future__ import annotations

import gc

# The collector's first generation runs after this many allocations net of frees.
GC_THRESHOLD = 50_000


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
