"""Submissions that wait for the registry event they name. No I/O.

A submission carrying a limit or strategy (``queue_concurrency_limit``,
``concurrency_strategy``) names the registry event that set it
(``queue_config_id``). The event travels on the registry stream, the
submission on its own queue, so the submission may arrive first: admitted
then, it would be decided under the old limit or strategy. Its owner holds it
here until the registry has delivered that event, or for ``bound`` seconds at
most (the gateway appended it, confirmed, before it published the submission,
but this reader may be far behind, or the id pushed out of the few it keeps
per queue); the submission is then admitted under what the registry says.

Order is kept: while one waits, every later submission waits behind it (they
were sent after the change too), and leaves with or after it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Heard = Callable[[str], bool]


class ConfigWait(Generic[T]):
    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.timed_out = 0  # admitted without having heard their event
        self._waiting: deque[tuple[float, str | None, T]] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def offer(self, item: T, config_id: str | None, heard: Heard, now: float) -> list[T]:
        """What may be admitted now, in order, ``item`` included if it need not wait."""
        if not self._waiting and (config_id is None or heard(config_id)):
            return [item]
        self._waiting.append((now + self.bound, config_id, item))
        return self.release(heard, now)

    def release(self, heard: Heard, now: float) -> list[T]:
        """What may be admitted now that more was heard (or time passed), in order."""
        released: list[T] = []
        waiting = self._waiting
        while waiting:
            deadline, config_id, item = waiting[0]
            if config_id is not None and not heard(config_id):
                if now < deadline:
                    break
                self.timed_out += 1
            waiting.popleft()
            released.append(item)
        return released

    def deadline(self) -> float | None:
        """When the first waiting submission is admitted even unheard (None: none waits)."""
        return self._waiting[0][0] if self._waiting else None

    def clear(self) -> None:
        self._waiting.clear()
