"""Who waits for a slot and who holds one, by concurrency key: the lifecycle's bookkeeping.

``QueueLifecycle`` (``dispatcher/lifecycle.py``) owns one ``Admission`` and
decides; this keeps the counts and orders those decisions read, for the queue's
strategy (see the lifecycle's docstring for what each strategy means):

- every strategy: the pending executions in arrival order (one FIFO), and the
  executions holding a slot by concurrency key (``holders``; the first is the
  dedup holder), so a takeover rebuilds them from the ledger's keys and a
  strategy change applies at once;
- ``partition`` and ``cancel_in_progress``: the pending ones again by key (one
  lane per key, None: those without one). ``deduplicate`` keeps no lanes: one
  ordered dict less per key on the default path;
- ``partition``: a heap of the keys that may admit now, by the arrival of their
  first pending one, so an admission costs O(log keys) and never walks a lane.

No I/O and no decisions: nothing here ends, starts or tells anything.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable

from dispatcher.execution import Execution, Stage
from schemas.registry import ConcurrencyStrategy


class Admission:
    """The pending executions of one queue and the slots held, under its limit and strategy."""

    def __init__(self, limit: int | None, strategy: ConcurrencyStrategy) -> None:
        self.limit = limit
        self.strategy: ConcurrencyStrategy = strategy
        # Pending executions in arrival order, and (partition, cancel_in_progress) the
        # same by concurrency key (None: those without one): ordered dicts, so any of
        # them leaves in O(1). deduplicate keeps no lanes: one dict less per key.
        self._fifo: OrderedDict[str, Execution] = OrderedDict()
        self._lanes: dict[str | None, OrderedDict[str, Execution]] = {}
        self._arrivals = 0
        self._parked = 0  # of the fifo, those released (asked after every flush: counted)
        # Executions holding a slot, by concurrency key (the first is the dedup holder).
        self._holders: dict[str | None, dict[str, Execution]] = {}
        self._used = 0
        # partition: the keys that may admit now, by the arrival of their first pending
        # one (a heap; an entry is live while ``_ready_at[key]`` is its seq). Read only
        # outside this class.
        self.ready: list[tuple[int, str | None]] = []
        self._ready_at: dict[str | None, int] = {}

    # -- what the lifecycle asks ---------------------------------------------------------

    @property
    def held(self) -> int:
        """Executions holding a slot."""
        return self._used

    @property
    def pending(self) -> int:
        return len(self._fifo)

    @property
    def parked(self) -> int:
        """Pending executions whose submission delivery was let go (kept in the ledger)."""
        return self._parked

    def has_slot(self) -> bool:
        return self.limit is None or self._used < self.limit

    def holding(self, key: str | None) -> int:
        """Executions with this concurrency key holding a slot (None: those without one)."""
        return len(self._holders.get(key, ()))

    def holder_of(self, key: str | None) -> str | None:
        """The execution id that holds this key's first slot (the dedup holder), if any."""
        holders = self._holders.get(key)
        return next(iter(holders)) if holders else None

    def of_key(self, key: str | None) -> list[Execution]:
        """Every execution of the key holding a slot, then every one pending (in a lane)."""
        return [*self._holders.get(key, {}).values(), *self._lanes.get(key, {}).values()]

    def head(self) -> Execution | None:
        """The earliest pending execution (the FIFO's head)."""
        return next(iter(self._fifo.values())) if self._fifo else None

    def queued(self) -> Iterable[Execution]:
        """The pending executions in their queue order."""
        return self._fifo.values()

    def next_by_key(self) -> Execution | None:
        """partition: the earliest arrival among the first pending ones of the keys with
        a free slot (a heap of keys, O(log keys)); None: no key may admit. Its key is
        out of the heap until ``mark`` puts it back."""
        while self.ready:
            seq, key = heapq.heappop(self.ready)
            if self._ready_at.get(key) != seq:
                continue  # superseded by a later entry of its key
            del self._ready_at[key]
            lane = self._lanes.get(key)
            if not lane:
                continue
            x = next(iter(lane.values()))
            if x.seq != seq or not self.lane_free(key):
                self.mark(key)  # marked again when a slot of the key frees
                continue
            return x
        return None

    # -- changes -------------------------------------------------------------------------

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        for key in self._lanes:
            self.mark(key)

    def set_strategy(self, strategy: ConcurrencyStrategy) -> None:
        """Lanes and heap built again by the new rule from the queue (same order)."""
        self.strategy = strategy
        self.ready.clear()
        self._ready_at.clear()
        self._lanes.clear()
        if strategy != "deduplicate":
            for x in self._fifo.values():
                self._lane_of(x)[x.execution_id] = x
        for key in self._lanes:
            self.mark(key)

    def enqueue(self, x: Execution) -> None:
        self._arrivals += 1
        x.seq = self._arrivals
        self._fifo[x.execution_id] = x
        self._parked += x.released
        if self.strategy == "deduplicate":
            return
        lane = self._lane_of(x)
        lane[x.execution_id] = x
        if len(lane) == 1:
            self.mark(x.key)

    def _lane_of(self, x: Execution) -> OrderedDict[str, Execution]:
        lane = self._lanes.get(x.key)
        if lane is None:
            lane = self._lanes[x.key] = OrderedDict()
        return lane

    def unqueue(self, x: Execution) -> None:
        """No longer pending (admitted, or ended while it waited)."""
        del self._fifo[x.execution_id]
        self._parked -= x.released
        lane = self._lanes.get(x.key)
        if lane is None:
            return  # deduplicate: no lanes
        del lane[x.execution_id]
        if not lane:
            del self._lanes[x.key]
        if self._ready_at.get(x.key) == x.seq:
            del self._ready_at[x.key]  # it led its key: the next one does
            self.mark(x.key)

    def vacate(self, x: Execution) -> None:
        """It ends: its slot (and key) or its place in the queue is free."""
        if x.holds_slot:
            self._used -= 1
            holders = self._holders[x.key]
            del holders[x.execution_id]
            if not holders:
                del self._holders[x.key]
            self.mark(x.key)
        elif x.stage is Stage.PENDING and x.execution_id in self._fifo:
            self.unqueue(x)

    def take_slot(self, x: Execution) -> None:
        self._used += 1
        holders = self._holders.get(x.key)
        if holders is None:
            holders = self._holders[x.key] = {}
        holders[x.execution_id] = x

    def released(self, x: Execution) -> None:
        """Its submission's delivery was let go: a pending one counts as parked now."""
        self._parked += x.stage is Stage.PENDING

    def lane_free(self, key: str | None) -> bool:
        return self.limit is None or len(self._holders.get(key, ())) < self.limit

    def mark(self, key: str | None) -> None:
        """partition: put the key among those that may admit, if it may."""
        if self.strategy != "partition" or key in self._ready_at:
            return
        lane = self._lanes.get(key)
        if not lane or not self.lane_free(key):
            return
        seq = next(iter(lane.values())).seq
        self._ready_at[key] = seq
        heapq.heappush(self.ready, (seq, key))
