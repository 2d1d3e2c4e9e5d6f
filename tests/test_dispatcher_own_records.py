"""An owner holds its own ledger records by their head alone (schemas.dispatch.own_ledger_seq).

Whatever the lifecycle writes must be recognised (or every checkpoint is
validated in full again) with the seq the full decode reads; anything else must
be left to the full decode.
"""

from __future__ import annotations

import orjson
import pytest

from dispatcher.lifecycle import QueueLifecycle, Tunables
from schemas.dispatch import LedgerRecord, decode_results_queue, own_ledger_seq
from tests.test_dispatcher_lifecycle import T0, envelope


def _records(owner: str) -> list[bytes]:
    """What a lifecycle writes: a checkpoint holding submissions, a delta, a tombstone."""
    lifecycle = QueueLifecycle(2, Tunables(), owner=owner)
    bodies: list[bytes] = []
    for n in range(1, 5):
        env, raw = envelope(n)
        lifecycle.on_submission(n, env, raw, 0, T0)
        lifecycle.take_effects()
        write = lifecycle.take_ledger(T0 + n)
        if write is not None:
            bodies.append(write.body)
            lifecycle.on_ledger_written(write)
    assert bodies
    return bodies


@pytest.mark.parametrize("owner", ["dispatcher-0123456789ab", "a"])
def test_every_record_the_lifecycle_writes_is_recognised_with_its_seq(owner: str) -> None:
    for body in _records(owner):
        record = decode_results_queue(body)
        assert isinstance(record, LedgerRecord)
        assert own_ledger_seq(body, owner, record.epoch) == record.seq


def test_records_of_another_owner_or_epoch_are_left_to_the_full_decode() -> None:
    body = _records("dispatcher-a")[0]
    epoch = orjson.loads(body)["epoch"]

    assert own_ledger_seq(body, "dispatcher-b", epoch) is None
    assert own_ledger_seq(body, "dispatcher-a", epoch + 1) is None
    assert own_ledger_seq(body, "dispatcher-", epoch) is None


@pytest.mark.parametrize(
    "body",
    [
        # Another layout of the same record: read in full, never guessed at.
        b'{"owner":"o","type":"ledger","epoch":1,"seq":2,"checkpoint":false,"entries":[]}',
        b'{"type": "ledger", "owner": "o", "epoch": 1, "seq": 2, "entries": []}',
        b'{"type":"completed","owner":"o","epoch":1,"seq":2,}',
        b'{"type":"ledger","owner":"o\\"","epoch":1,"seq":2,"entries":[]}',
        b"",
    ],
)
def test_anything_else_is_left_to_the_full_decode(body: bytes) -> None:
    assert own_ledger_seq(body, "o", 1) is None
