"""One execution as its queue's lifecycle knows it, and what the lifecycle answers.

The value types of ``dispatcher/lifecycle.py`` (the state machine): an
``Execution`` and its ``Stage``, the ``Tunables``, the effects the owner carries
out (``dispatcher/effects.py``: ``Dispatch``, ``Emit``, ``SendCancel``, ``Ack``,
``LedgerWrite``), and the small records the machine keeps of its own (an end not
announced yet, a cancel wanted before its execution arrived, the kinds of timer).
No behaviour beyond what a value says of itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from schemas.dispatch import Cancelled, Completed, ErrorInfo, ExecutionStatus, Failed
from schemas.envelope import SubmissionEnvelope
from schemas.ids import rfc3339

Ref = int
"""An opaque handle of a delivery the owner holds."""

TerminalResult = Completed | Failed | Cancelled


class Stage(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    WAITING_RETRY = "waiting_retry"
    TERMINAL = "terminal"


@dataclass(frozen=True, slots=True)
class Tunables:
    lease_seconds: float = 30.0
    hold_seconds: float = 20.0
    cancel_queued_wait_seconds: float = 3600.0
    cancel_unknown_wait_seconds: float = 10.0
    # A record that would carry only ends (tombstones) waits this long for another
    # record to ride on, or until this many deliveries wait on it (0: never waits).
    ends_linger_seconds: float = 0.0
    ends_batch: int = 64


@dataclass(slots=True, eq=False)
class Execution:
    execution_id: str
    attempt: int
    key: str | None
    workflow_id: str
    deployment_id: str
    envelope: SubmissionEnvelope | None
    raw: bytes | None
    stage: Stage = Stage.PENDING
    submission: Ref | None = None  # its delivery, while we hold it
    received_at: float = 0.0
    released: bool = False  # the ledger holds its envelope; its delivery was let go
    in_ledger: bool = False  # some record names it: its end needs a tombstone
    dispatch_id: str | None = None
    dispatches: int = 0  # how many times it was handed out
    deadline: float | None = None
    lease_until: float | None = None
    worker_id: str | None = None
    started_at: str | None = None
    republish: bool = False  # to be dispatched once its submission is back (no envelope yet)
    # Its dispatch may never have been published (a dead owner's last record named
    # it, or it waits for its submission to be sent again): it keeps a lease until
    # a worker reports it, and the ledger says so, so every later owner knows too.
    unsent: bool = False
    retries: int = 0  # retries before the current (or next) run: Polos's retry_count
    retry_at: float | None = None  # when waiting for a retry: its dispatch
    retry_of: str | None = None  # when waiting for a retry: the dispatch that failed
    seq: int = 0  # its place in the queue, while pending (arrival order)

    @property
    def holds_slot(self) -> bool:
        return self.stage in (Stage.DISPATCHED, Stage.RUNNING, Stage.WAITING_RETRY)

    @property
    def run_timeout(self) -> int | None:
        return self.envelope.run_timeout_seconds if self.envelope is not None else None


# -- effects ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    execution: Execution
    dispatch_id: str
    deadline: float
    count: int = 1
    retry_count: int = 0


@dataclass(frozen=True, slots=True)
class Emit:
    """A lifecycle event. A terminal one must be confirmed before the end is recorded
    (the ledger's tombstone) and the deliveries it settles are acknowledged: the
    effector tells ``on_announced``; until then the execution stays in the ledger as
    it was, so a new owner hears of it again (its result or submission comes back)."""

    status: ExecutionStatus
    execution: Execution
    dispatch_id: str | None = None
    worker_id: str | None = None
    duplicate_of: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    with_submission: bool = False
    cancelled_by: str | None = None
    at: str | None = None
    started_at: str | None = None
    terminal: bool = False
    # The run it is about; None: the execution's current one when it is published.
    retry_count: int | None = None
    retry_at: str | None = None


@dataclass(frozen=True, slots=True)
class SendCancel:
    execution: Execution
    reason: Literal["timeout", "user", "superseded"]
    dispatch_id: str | None = None
    worker_id: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    ref: Ref


Effect = Dispatch | Emit | SendCancel | Ack


@dataclass(frozen=True, slots=True)
class LedgerWrite:
    seq: int
    checkpoint: bool
    body: bytes
    # Deliveries settled by the ends this record carries: acknowledged once it is confirmed.
    settles: tuple[Ref, ...] = ()


@dataclass(slots=True)
class Ending:
    """A terminal execution whose event is not confirmed yet."""

    execution: Execution
    was: Stage  # its stage before: what the ledger says of it until the event is out
    refs: list[Ref]


@dataclass(slots=True)
class WantedCancel:
    requested_by: str
    until: float


class Timer(StrEnum):
    DEADLINE = "deadline"
    LEASE = "lease"
    HOLD = "hold"
    RETRY = "retry"


def decided_at(now: float) -> str:
    """Events say when the owner decided, not when they were published."""
    return rfc3339(int(now * 1e9))


def user_cancel(requested_by: str) -> ErrorInfo:
    return ErrorInfo(type="cancelled", message=f"cancelled on request of {requested_by}")


def superseded_by(execution_id: str) -> ErrorInfo:
    return ErrorInfo(
        type="cancelled",
        message=f"superseded by the newer execution {execution_id} with the same "
        "concurrency_key (cancel_in_progress)",
    )
