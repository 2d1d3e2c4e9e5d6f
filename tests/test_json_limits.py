"""The budget of ``schemas.limits`` against the real encoders and decoders of every layer.

If pydantic's parser, orjson, or an envelope changes how deep a submitted value
sits, these fail: the gateway's check would no longer match what later layers
accept (DESIGN G6).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gateway.settings import Settings
from schemas.dispatch import (
    Completed,
    ExecutionStatus,
    LifecycleEvent,
    Results,
    decode_lifecycle,
    decode_results_queue,
    decode_work,
    encode,
    encode_queued_event,
    encode_results,
    encode_work,
)
from schemas.envelope import decode_submission
from schemas.limits import (
    JSON_NESTING_LIMIT,
    MAX_BODY_BYTES_CAP,
    MAX_INT,
    MAX_RESULT_DEPTH,
    MAX_VALUE_DEPTH,
    MIN_INT,
    ORJSON_ENCODE_DEPTH,
    ORJSON_READ_DEPTH,
    RESULTS_BATCH_NESTING,
    nests_deeper,
)
from tests.envelopes import make_submission
from worker._reporting import MAX_BATCHED_BRACKETS


def nested(depth: int) -> Any:
    """A value nesting ``depth`` levels, alternating objects and arrays."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def _envelope(payload: Any = None, initial_state: Any = None) -> bytes:
    return make_submission(
        execution_id="0190b6c5-2b1a-7c3d-8e4f-000000000001",
        created_at="2026-01-01T00:00:00.000000Z",
        payload=payload,
        initial_state=initial_state,
    )


def _every_layer_reads(envelope: bytes) -> None:
    """Decode ``envelope`` in every message a later layer gets it in."""
    submission = decode_submission(envelope)  # the owner
    work = encode_work(dispatch_id="d", deadline=1.0, results_queue="r", submission_raw=envelope)
    decode_work(work)  # the worker
    decode_results_queue(work)  # the owner's marker, read back on a takeover
    queued = encode_queued_event(
        execution_id=submission.execution_id,
        created_at=submission.created_at,
        project_id="p",
        workflow_id="w",
        deployment_id="v1",
        queue_name="q",
        concurrency_key=None,
        submission_raw=envelope,
    )
    decode_lifecycle(queued)  # the recorder and event streams
    admitted = LifecycleEvent(
        status=ExecutionStatus.ADMITTED,
        execution_id=submission.execution_id,
        project_id="p",
        workflow_id="w",
        deployment_id="v1",
        queue_name="q",
        at=submission.created_at,
        submission=submission,
    )
    decode_lifecycle(encode(admitted))


@pytest.mark.parametrize("field", ["payload", "initial_state"])
def test_a_value_at_the_budget_is_read_by_every_layer_and_one_deeper_is_not(field: str) -> None:
    _every_layer_reads(_envelope(**{field: nested(MAX_VALUE_DEPTH)}))
    with pytest.raises(ValidationError):
        _every_layer_reads(_envelope(**{field: nested(MAX_VALUE_DEPTH + 1)}))


def test_a_result_at_its_budget_is_read_by_the_owner_and_the_recorder() -> None:
    def both(result: Any) -> None:
        completed = Completed(
            execution_id="e", dispatch_id="d", worker_id="w", at="t", result=result
        )
        decode_results_queue(encode(completed))
        event = LifecycleEvent(
            status=ExecutionStatus.COMPLETED,
            execution_id="e",
            project_id="p",
            workflow_id="w",
            deployment_id="v1",
            queue_name="q",
            at="t",
            result=result,
        )
        decode_lifecycle(encode(event))

    both(nested(MAX_RESULT_DEPTH))
    with pytest.raises(ValidationError):
        both(nested(MAX_RESULT_DEPTH + 1))


def test_a_batched_result_is_read_by_the_owner_up_to_what_the_worker_batches() -> None:
    def batched(result: Any) -> None:
        completed = Completed(
            execution_id="e", dispatch_id="d", worker_id="w", at="t", result=result
        )
        report = encode(completed)
        decoded = decode_results_queue(encode_results([report, report]))
        assert isinstance(decoded, Results)
        assert [r.result for r in decoded.reports if isinstance(r, Completed)] == [result] * 2

    # The worker batches a report whose brackets are at most MAX_BATCHED_BRACKETS
    # (the report's own object counts one): that deep, a batch still decodes.
    batched(nested(MAX_BATCHED_BRACKETS - 1))
    with pytest.raises(ValidationError):
        batched(nested(MAX_BATCHED_BRACKETS))
    assert MAX_BATCHED_BRACKETS == JSON_NESTING_LIMIT - RESULTS_BATCH_NESTING


@pytest.mark.parametrize(
    ("value", "limit", "deeper"),
    [
        (None, 0, False),
        ("text", 0, False),
        ([], 0, True),
        ([], 1, False),
        ({"a": [1, {"b": 2}]}, 3, False),
        ({"a": [1, {"b": 2}]}, 2, True),
        (nested(MAX_VALUE_DEPTH), MAX_VALUE_DEPTH, False),
        (nested(MAX_VALUE_DEPTH + 1), MAX_VALUE_DEPTH, True),
        (nested(1000), MAX_VALUE_DEPTH, True),
        ([nested(3), nested(MAX_VALUE_DEPTH - 1)], MAX_VALUE_DEPTH, False),
        ([nested(3), nested(MAX_VALUE_DEPTH)], MAX_VALUE_DEPTH, True),
    ],
)
def test_nests_deeper_measures_depth_exactly(value: Any, limit: int, deeper: bool) -> None:
    assert nests_deeper(value, limit) is deeper


def test_orjson_reads_and_encodes_as_deep_and_as_wide_as_the_limits_assume() -> None:
    orjson.loads("[" * ORJSON_READ_DEPTH + "]" * ORJSON_READ_DEPTH)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads("[" * (ORJSON_READ_DEPTH + 1) + "]" * (ORJSON_READ_DEPTH + 1))
    orjson.dumps(nested(ORJSON_ENCODE_DEPTH))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(nested(ORJSON_ENCODE_DEPTH + 1))
    assert orjson.loads(orjson.dumps([MIN_INT, MAX_INT])) == [MIN_INT, MAX_INT]
    for wide in (MIN_INT - 1, MAX_INT + 1):
        with pytest.raises(orjson.JSONEncodeError):
            orjson.dumps(wide)
        # ... and reads it inexactly, which is why the gateway refuses it.
        assert isinstance(orjson.loads(str(wide)), float)


def test_the_body_limit_cannot_exceed_what_one_broker_message_carries() -> None:
    Settings(max_body_bytes=MAX_BODY_BYTES_CAP)
    with pytest.raises(ValidationError):
        Settings(max_body_bytes=MAX_BODY_BYTES_CAP + 1)
