"""A workflow's retry policy: how often a failed run is tried again, and how long to wait.

The worker knows the policy (it is registered with the workflow); the owning
dispatcher knows the slot, the lease and the deadline. So the worker only says,
in its ``Failed`` report, whether another run is wanted and after how long
(``retry_in``); the dispatcher waits for it durably (its ledger), dispatches
the next run with ``retry_count + 1``, and ends the execution ``failed`` instead
when the next run would start at or after the run's deadline.

Not retried: a ``NonRetryableError`` (raised by the handler, or a subclass of
it), a result that cannot be sent (not JSON, nested too deep: the same code
would fail the same way), a handler that cancelled itself, and anything that
ends the run otherwise (its deadline, a cancel).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_RETRIES = 2
"""Polos retries a failed run twice by default; so do we."""
MAX_RETRIES = 100
"""Each failed run's error (with its traceback) is kept in the record."""
DEFAULT_FIRST_WAIT = 1.0
DEFAULT_CAP = 300.0


class NonRetryableError(Exception):
    """Raised by a handler: this run failed, and running it again will not help.

    The execution ends ``failed`` at once, whatever retries its workflow allows.
    """


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: the n-th retry (from 0) waits
    ``min(first * factor**n, cap)`` seconds, less up to ``jitter`` of it, drawn at
    random, so runs that failed together are not retried together."""

    first: float = DEFAULT_FIRST_WAIT
    factor: float = 2.0
    cap: float = DEFAULT_CAP
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.first) and self.first >= 0):
            raise ValueError(f"backoff first wait must be a number >= 0, got {self.first!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"backoff factor must be >= 1, got {self.factor!r}")
        if not (math.isfinite(self.cap) and self.cap >= self.first):
            raise ValueError(f"backoff cap must be >= the first wait, got {self.cap!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be between 0 and 1, got {self.jitter!r}")

    def delay(self, retry: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        # Capped before raising to the power: a large retry number cannot overflow.
        base = self.cap if retry >= 64 else min(self.first * self.factor**retry, self.cap)
        return base * (1 - self.jitter * draw())


DEFAULT_BACKOFF = Backoff()
"""0.5-1 s before the first retry, 1-2 s before the second, ... at most 300 s."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = DEFAULT_RETRIES
    backoff: Backoff = DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise TypeError(f"retries must be an int, got {self.retries!r}")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"retries must be between 0 and {MAX_RETRIES}, got {self.retries}")

    @classmethod
    def of(cls, retries: int, backoff: float | Backoff) -> RetryPolicy:
        """``backoff`` as a number is the first wait in seconds (doubling, jittered)."""
        if isinstance(backoff, bool) or not isinstance(backoff, int | float | Backoff):
            raise TypeError(f"backoff must be seconds or a Backoff, got {backoff!r}")
        if not isinstance(backoff, Backoff):
            backoff = Backoff(first=float(backoff), cap=max(DEFAULT_CAP, float(backoff)))
        return cls(retries=retries, backoff=backoff)

    def retry_in(self, retry_count: int, error: BaseException) -> float | None:
        """After the run numbered ``retry_count`` (0: the first) raised ``error``: the
        wait before the next run, or None if there is none."""
        if not retryable(error) or retry_count >= self.retries:
            return None
        return self.backoff.delay(retry_count)


def retryable(error: BaseException) -> bool:
    """A handler's own exception, unless it says it is final. A ``CancelledError``
    (the handler cancelled itself) is none: it chose to stop."""
    return isinstance(error, Exception) and not isinstance(error, NonRetryableError)
