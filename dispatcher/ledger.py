"""The ledger's entries: an execution written into a record, and records folded back.

The lifecycle (``dispatcher/lifecycle.py``) decides what each flush's record
carries and when it is a checkpoint; this module is how an execution, a wanted
cancel and an end are written in a ``LedgerRecord`` (``schemas/dispatch.py``),
and how a new owner folds the records of the owners before it into the state it
takes over (``QueueLifecycle.rebuild``): the newest entry of each execution wins,
a checkpoint starts over, a tombstone (``ended``) drops what it names. And which
records the owner holds until a confirmed checkpoint lets them go (``HeldRecords``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from dispatcher.execution import Execution, Ref, Stage, WantedCancel
from schemas.dispatch import LedgerEntry, LedgerRecord

_REBUILT_STAGES = {
    "dispatched": Stage.DISPATCHED,
    "running": Stage.RUNNING,
    "waiting_retry": Stage.WAITING_RETRY,
}


# -- writing ----------------------------------------------------------------------------


def entry(x: Execution, stage_of: Stage | None = None) -> dict[str, Any]:
    at = stage_of or x.stage
    stage = at.value if at is not Stage.TERMINAL else "ended"
    entry: dict[str, Any] = {
        "execution_id": x.execution_id,
        "stage": stage,
        "dispatch_id": x.dispatch_id,
        "dispatch_count": x.dispatches,
        "deadline": x.deadline,
        "attempt": x.attempt,
        "concurrency_key": x.key,
        "workflow_id": x.workflow_id,
        "deployment_id": x.deployment_id,
    }
    if x.unsent and at is Stage.DISPATCHED:
        entry["unsent"] = True
    if x.retries:
        entry["retry_count"] = x.retries
    if x.retry_at is not None:
        entry["retry_at"] = x.retry_at
        entry["retry_of"] = x.retry_of
    if x.released and x.raw is not None:
        entry["submission"] = orjson.Fragment(x.raw)
    return entry


def cancel_entry(execution_id: str, wanted: WantedCancel) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "stage": "cancel",
        "requested_by": wanted.requested_by,
        "until": wanted.until,
    }


def ended_entry(execution_id: str) -> dict[str, Any]:
    """A tombstone."""
    return {"execution_id": execution_id, "stage": "ended"}


def encode_record(
    owner: str, epoch: int, seq: int, checkpoint: bool, entries: list[dict[str, Any]]
) -> bytes:
    return orjson.dumps(
        {
            "type": "ledger",
            "owner": owner,
            "epoch": epoch,
            "seq": seq,
            "checkpoint": checkpoint,
            "entries": entries,
        }
    )


# -- the records held -------------------------------------------------------------------


class HeldRecords:
    """The ledger records the owner holds unacknowledged: its own until a newer
    checkpoint of its own is confirmed (so the newest always is), and those of the
    owners before it until its first checkpoint is."""

    def __init__(self) -> None:
        self._checkpointed = -1  # seq of the newest confirmed checkpoint
        self._own: list[tuple[int, Ref]] = []
        self._foreign: list[Ref] = []

    def hold(self, ref: Ref, seq: int) -> bool:
        """One of ours, read back. False: a confirmed checkpoint is newer, let it go."""
        if seq < self._checkpointed:
            return False
        self._own.append((seq, ref))
        return True

    def foreign(self, refs: Iterable[Ref]) -> None:
        """The records a takeover folded."""
        self._foreign.extend(refs)

    def checkpointed(self, seq: int) -> list[Ref]:
        """Our checkpoint ``seq`` is confirmed: the records it makes redundant, to be
        acknowledged (ours older than it, in order, then every foreign one)."""
        self._checkpointed = seq
        done: list[Ref] = []
        keep: list[tuple[int, Ref]] = []
        for held, ref in self._own:
            if held < seq:
                done.append(ref)
            else:
                keep.append((held, ref))
        self._own = keep
        done.extend(self._foreign)
        self._foreign.clear()
        return done


# -- reading ----------------------------------------------------------------------------


@dataclass(slots=True)
class Fold:
    """What the records of the owners before us say, folded."""

    refs: list[Ref]  # every record, oldest first: acknowledged after our first checkpoint
    entries: list[LedgerEntry]  # the newest entry of each execution not ended, in order
    cancels: dict[str, WantedCancel]  # cancels wanted of executions not here yet
    ended: list[str]  # tombstones, in order
    epoch: int | None  # of the newest record (None: no record)
    # Dispatched ones whose work may never have been published.
    unsure: set[str]


def fold(records: Iterable[tuple[Ref, LedgerRecord]], cancels: dict[str, WantedCancel]) -> Fold:
    """Fold the records (any order: (epoch, seq) orders them) onto the cancels wanted
    so far (a checkpoint drops those too)."""
    ordered = sorted(records, key=lambda item: (item[1].epoch, item[1].seq))
    cancels = dict(cancels)
    refs: list[Ref] = []
    ended: list[str] = []
    state: OrderedDict[str, LedgerEntry] = OrderedDict()
    for ref, record in ordered:
        refs.append(ref)
        if record.checkpoint:
            state.clear()
            cancels.clear()
        for e in record.entries:
            if e.stage == "ended":
                state.pop(e.execution_id, None)
                cancels.pop(e.execution_id, None)
                ended.append(e.execution_id)
            elif e.stage == "cancel":
                if e.until is not None and e.requested_by is not None:
                    cancels[e.execution_id] = WantedCancel(e.requested_by, e.until)
            else:
                state[e.execution_id] = e
    if ordered:
        epoch: int | None = ordered[-1][1].epoch
        last = ordered[-1][1]
        unsure = {e.execution_id for e in last.entries if e.stage == "dispatched"}
    else:
        epoch = None
        unsure = set()
    # And what an owner before it already was not sure of (carried in its records).
    unsure |= {i for i, e in state.items() if e.stage == "dispatched" and e.unsent}
    return Fold(refs, list(state.values()), cancels, ended, epoch, unsure)


def restore(entry: LedgerEntry) -> Execution:
    """The execution an entry (not a tombstone, not a cancel) describes."""
    submission = entry.submission
    return Execution(
        execution_id=entry.execution_id,
        attempt=entry.attempt,
        key=entry.concurrency_key,
        workflow_id=entry.workflow_id,
        deployment_id=entry.deployment_id,
        envelope=submission,
        raw=orjson.dumps(submission.model_dump(mode="json")) if submission else None,
        stage=Stage.PENDING if entry.stage == "pending" else _REBUILT_STAGES[entry.stage],
        released=submission is not None,
        in_ledger=True,
        dispatch_id=entry.dispatch_id,
        dispatches=entry.dispatch_count,
        deadline=entry.deadline,
        retries=entry.retry_count,
    )
