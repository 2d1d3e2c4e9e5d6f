"""Wire formats between dispatcher and workers, and the lifecycle events.

    dispatcher ──WorkMessage──► polos.work.<project>.<deployment> ──► worker
    worker ──Heartbeat (running + lease renewals, one per worker and flush)─┐
    worker ──Completed/Failed/Cancelled/Released, or a Results batch of them─┤
    owner  ──LedgerRecord (its durable in-flight state, to itself)───────────┤
    dispatcher ──OwnerProbe (who owns it? / a sync marker)───────────────────┤
                                                polos.results.<project>.<queue>
    owner  ──CancelMessage──► polos.cancel (routing key = work queue) ──► workers
    owner  ──EventBatch─► polos.events (topic, key <project>) ──► anyone (recorder, tests)
    gateway ──EventBatch(queued events)─► polos.events, once per event-loop round
    gateway ──CancelRequest──► polos.results.<project>.<queue> ──► owner (a user's cancel)

``dispatch_id`` identifies one hand-over of an execution to the workers; a
re-dispatch (its lease expired, or its worker released it) gets a new one.

Leases (DESIGN §3). A worker that has run an execution for ``running_delay``
(a few tens of ms) reports it in a ``Heartbeat`` to the work's
``results_queue``; once that heartbeat is confirmed the worker acknowledges the
work delivery, and from then on the execution is protected by its lease only:
the worker renews it with one heartbeat per results queue every
``lease_seconds / 3`` carrying everything it runs there, the owner keeps it
until ``receipt of the last heartbeat + lease_seconds``, and a worker whose
heartbeats are not confirmed stops its copy ``lease_seconds - margin`` after
the last confirmed one, so a re-dispatch never overlaps a stale copy. A run
that ends before ``running_delay`` is never reported running: its result
carries ``started_at``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.envelope import SubmissionEnvelope


class ExecutionStatus(StrEnum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    DEDUPLICATED = "deduplicated"


TERMINAL_STATUSES = frozenset(
    {
        ExecutionStatus.COMPLETED,
        ExecutionStatus.FAILED,
        ExecutionStatus.TIMED_OUT,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.DEDUPLICATED,
    }
)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


DEFAULT_LEASE_SECONDS = 30.0


class WorkMessage(_Message):
    """An admitted execution handed to the worker fleet of its deployment."""

    type: Literal["work"] = "work"
    dispatch_id: str
    deadline: float = Field(description="Unix seconds; the run is cancelled at this time")
    results_queue: str
    lease_seconds: float = Field(
        default=DEFAULT_LEASE_SECONDS,
        gt=0,
        description="How long the owner keeps a lease after the last heartbeat it received",
    )
    dispatch_count: int = Field(
        default=1,
        ge=1,
        description="How many times the owner handed this execution out, this one included "
        "(more than 1: a lease expired or a worker released it)",
    )
    submission: SubmissionEnvelope
    # The submission's delivery attempt it was admitted under (LifecycleEvent.attempt):
    # an owner that finds this as a marker after a takeover reports under it.
    attempt: int = 0
    retry_count: int = Field(
        default=0,
        ge=0,
        description="Retries of the run before this one (Polos's retry_count): 0 for the first "
        "run, n for the n-th retry after a Failed report that asked for one",
    )


def encode_work(
    *,
    dispatch_id: str,
    deadline: float,
    results_queue: str,
    submission_raw: bytes,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    dispatch_count: int = 1,
    attempt: int = 0,
    retry_count: int = 0,
) -> bytes:
    """Embed the submission as received, without decoding and re-encoding it."""
    return orjson.dumps(
        {
            "type": "work",
            "dispatch_id": dispatch_id,
            "deadline": deadline,
            "results_queue": results_queue,
            "lease_seconds": lease_seconds,
            "dispatch_count": dispatch_count,
            "submission": orjson.Fragment(submission_raw),
            "attempt": attempt,
            "retry_count": retry_count,
        }
    )


# -- results queue ----------------------------------------------------------------


class Dispatched(_Message):
    """The owner's marker: this execution was handed to the workers.

    The owner keeps it unacknowledged until the execution is terminal, so a
    dispatcher taking over finds it (requeued) and knows not to dispatch again.
    """

    type: Literal["dispatched"] = "dispatched"
    execution_id: str
    dispatch_id: str
    deadline: float
    at: str
    attempt: int = 0


class Running(_Message):
    type: Literal["running"] = "running"
    execution_id: str
    dispatch_id: str
    worker_id: str
    at: str


class HeartbeatEntry(_Message):
    execution_id: str
    dispatch_id: str
    started_at: str
    redelivered: bool = Field(
        default=False,
        description="The broker redelivered this work to us: its earlier holder is gone "
        "(a worker stops an unacknowledged copy when its channel dies)",
    )


class Heartbeat(_Message):
    """A worker runs these executions of one results queue (and renews their leases).

    Published persistent, mandatory, with confirm, one per results queue and
    flush: ``running_delay`` after an execution started (if it still runs), and
    every ``lease_seconds / 3`` for all of them. The first heartbeat that carries
    a dispatch is its ``running`` report.
    """

    type: Literal["heartbeat"] = "heartbeat"
    worker_id: str
    at: str
    executions: list[HeartbeatEntry]


class Completed(_Message):
    type: Literal["completed"] = "completed"
    execution_id: str
    dispatch_id: str
    worker_id: str
    at: str
    started_at: str | None = None
    result: Any = None


class ErrorInfo(_Message):
    type: str
    message: str
    traceback: str | None = None


class Failed(_Message):
    """The handler raised. ``retry_in`` set: the workflow's retry policy (worker SDK)
    wants another run that many seconds from now; the owner decides whether there is
    one (the run's deadline covers every run and every wait between them)."""

    type: Literal["failed"] = "failed"
    execution_id: str
    dispatch_id: str
    worker_id: str
    at: str
    started_at: str | None = None
    error: ErrorInfo
    retry_in: float | None = Field(default=None, ge=0)


class Cancelled(_Message):
    """The worker stopped the run because it was told to (or its deadline passed)."""

    type: Literal["cancelled"] = "cancelled"
    execution_id: str
    dispatch_id: str
    worker_id: str
    at: str
    started_at: str | None = None
    reason: str


class Released(_Message):
    """The worker gives a dispatch back without a result (it is shutting down, or
    it lost its lease): the owner dispatches the execution again at once."""

    type: Literal["released"] = "released"
    execution_id: str
    dispatch_id: str
    worker_id: str
    at: str
    reason: str


Report = Annotated[Completed | Failed | Cancelled | Released, Field(discriminator="type")]


class Results(_Message):
    """Several reports of one worker to one results queue, in one message.

    A worker's results that are decided in the same event-loop round go out
    together: one quorum enqueue, delivery and acknowledgement for all of them
    (DESIGN §5: batch derived messages). The owner takes each report as if it
    had come alone and acknowledges the message once it is done with all of
    them. A worker sends a lone report as itself, not as a batch of one.
    ``reports`` nest one object and one array deeper than a lone report
    (``schemas.limits.RESULTS_BATCH_NESTING``): a deeper one goes alone.
    """

    type: Literal["results"] = "results"
    reports: list[Report] = Field(min_length=1)


def encode_results(reports: Sequence[bytes]) -> bytes:
    """A ``Results`` message of already encoded reports (not encoded again)."""
    return b'{"type":"results","reports":[' + b",".join(reports) + b"]}"


ResultMessage = Annotated[
    Dispatched | Running | Completed | Failed | Cancelled | Released | Heartbeat | Results,
    Field(discriminator="type"),
]
RESULT_MESSAGE: TypeAdapter[ResultMessage] = TypeAdapter(ResultMessage)


def decode_result(raw: bytes) -> ResultMessage:
    return RESULT_MESSAGE.validate_json(raw)


# One report as the owner takes it, whether it came alone or in a ``Results`` batch.
LoneReport = Dispatched | Running | Completed | Failed | Cancelled | Released | Heartbeat


def decode_reports(raw: bytes) -> list[LoneReport]:
    """What a worker said in one message: a ``Results`` batch unpacked, else the one."""
    message = decode_result(raw)
    if isinstance(message, Results):
        return list(message.reports)
    return [message]


class CancelRequest(_Message):
    """A user asked to cancel an execution (``POST /api/v1/executions/{id}/cancel``).

    The gateway publishes it to the results queue of the execution's submission
    queue: the owner's inbox, durable, so an owner that takes over finds it.
    ``seen_status`` is the status the gateway read from the execution store; an
    owner that has not seen the execution uses it to tell "still queued in the
    broker" (wait for it) from "long finished" (drop the request).
    """

    type: Literal["cancel_request"] = "cancel_request"
    execution_id: str
    requested_by: str = Field(description="The API key id of the caller")
    at: str
    seen_status: ExecutionStatus | None = None


# -- the owner's ledger -------------------------------------------------------------


class LedgerEntry(_Message):
    """What the owner knows of one execution, as of the record that carries it.

    ``stage``: ``pending`` (waiting for a slot), ``dispatched`` (work published,
    no report yet), ``running`` (reported: only its lease protects it),
    ``waiting_retry`` (a run failed; the next is dispatched at ``retry_at``, and
    the slot stays held meanwhile), ``ended`` (terminal: a tombstone), ``cancel``
    (a user's cancel request for an execution not seen yet, kept until
    ``until``). ``submission`` is present once the submission's delivery was
    released: the record is then its only copy. ``retry_count``: retries before
    the current (or next) run; ``retry_of``: the dispatch whose failure a
    waiting retry follows. ``unsent``: a dispatched one whose work may never
    have been published (a dead owner's last record named it): every owner
    gives it a lease from its takeover, so it runs again if nobody reports it.
    """

    execution_id: str
    stage: Literal["pending", "dispatched", "running", "waiting_retry", "ended", "cancel"]
    dispatch_id: str | None = None
    dispatch_count: int = 0
    deadline: float | None = None
    attempt: int = 0
    concurrency_key: str | None = None
    workflow_id: str = ""
    deployment_id: str = ""
    submission: SubmissionEnvelope | None = None
    requested_by: str | None = None
    until: float | None = None
    retry_count: int = 0
    retry_at: float | None = None
    retry_of: str | None = None
    unsent: bool = False


class LedgerRecord(_Message):
    """The owner's durable in-flight state, on its own results queue.

    The owner keeps every record it wrote unacknowledged until a later
    ``checkpoint`` (the whole state) is confirmed, then acknowledges the older
    ones; a checkpoint is written at least every ``hold_seconds``, so no record is
    held longer and the newest one always is (a standby is woken by its return
    when the owner dies). ``epoch`` grows with every new owner; (epoch, seq)
    orders the records of all owners.
    """

    type: Literal["ledger"] = "ledger"
    owner: str
    epoch: int
    seq: int
    checkpoint: bool
    entries: list[LedgerEntry]


class OwnerProbe(_Message):
    """Published by a dispatcher to a results queue it consumes: only the active
    (single active consumer) one receives it, so receiving its own probe tells it
    that it owns the queue, and that everything queued before it was delivered."""

    type: Literal["owner_probe"] = "owner_probe"
    owner: str
    nonce: str


# The owner's marker is the work message itself: one publish to the work queue
# with the results queue in ``BCC``, so the broker stores marker and work
# together or neither (two publishes can be split by a crash, leaving a marker
# without work: an execution that would hang until its deadline). ``Dispatched``
# is still read, as a marker without the work.
ResultsQueueMessage = Annotated[
    Dispatched
    | Running
    | Completed
    | Failed
    | Cancelled
    | Released
    | Heartbeat
    | Results
    | WorkMessage
    | CancelRequest
    | LedgerRecord
    | OwnerProbe,
    Field(discriminator="type"),
]
RESULTS_QUEUE_MESSAGE: TypeAdapter[ResultsQueueMessage] = TypeAdapter(ResultsQueueMessage)


def decode_results_queue(raw: bytes) -> ResultsQueueMessage:
    """What the owner reads from a results queue: results, its markers, cancel requests."""
    return RESULTS_QUEUE_MESSAGE.validate_json(raw)


# How the owner writes a record (orjson keeps the order of ``take_ledger``'s dict):
# type, owner, epoch and seq first, then the entries.
_LEDGER_HEAD = re.compile(
    rb'\{"type":"ledger","owner":"([^"\\]*)","epoch":(\d{1,18}),"seq":(\d{1,18}),'
)


def own_ledger_seq(raw: bytes, owner: str, epoch: int) -> int | None:
    """The ``seq`` of a ledger record that ``owner`` wrote in ``epoch``, read from its head
    alone; None for anything else (another owner's record, another message, another
    layout), which ``decode_results_queue`` reads in full.

    While it owns the queue the owner receives each of its records back and only
    holds it by its ``seq``; validating a checkpoint's entries (the whole in-flight
    state, submissions included) was its largest decoding cost.
    """
    head = _LEDGER_HEAD.match(raw)
    if head is None or head[1] != owner.encode() or int(head[2]) != epoch:
        return None
    return int(head[3])


# -- cancel -------------------------------------------------------------------------


class CancelMessage(_Message):
    """Stop an execution. ``dispatch_id`` set: only that dispatch (a stale copy the
    owner superseded); None: any copy of the execution."""

    type: Literal["cancel"] = "cancel"
    execution_id: str
    reason: Literal["timeout", "user", "superseded"]
    at: str
    dispatch_id: str | None = None
    worker_id: str | None = Field(
        default=None, description="Set: only this worker's copy (a second one of a dispatch)"
    )


# -- lifecycle events -----------------------------------------------------------------


class LifecycleEvent(_Message):
    """One transition of one execution, published on ``polos.events`` in an ``EventBatch``.

    ``submission`` is carried on the first events of an execution (the
    gateway's ``queued``, the owner's ``admitted`` or ``deduplicated``) so
    followers can build a full record without asking. ``cancelled_by`` is the
    key id of whoever asked for a ``cancelled`` execution to stop.

    ``retry_count`` is the run the event is about (0: the first, n: the n-th
    retry). A run that failed and is to be retried is reported as ``running``
    with its ``error`` and ``retry_at`` (when the next run is dispatched): the
    execution is not over, so no terminal status, and the store keeps each
    failed run's error (``store.update``).

    ``attempt`` is the delivery attempt of the submission under which the
    decision this event reports was taken (its quorum-queue delivery count; 0
    for the first delivery and the gateway's ``queued``). A decision of a
    later attempt supersedes those of earlier ones, whose acknowledgement was
    lost (``store.update``).
    """

    type: Literal["lifecycle"] = "lifecycle"
    status: ExecutionStatus
    execution_id: str
    project_id: str
    workflow_id: str
    deployment_id: str
    queue_name: str
    concurrency_key: str | None = None
    at: str
    dispatch_id: str | None = None
    worker_id: str | None = None
    duplicate_of: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    submission: SubmissionEnvelope | None = None
    cancelled_by: str | None = None
    started_at: str | None = None
    attempt: int = Field(
        default=0,
        description="The delivery attempt of the submission the deciding owner acted on "
        "(x-delivery-count): a later attempt's decision supersedes an earlier one's",
    )
    retry_count: int = Field(default=0, ge=0, description="The run it is about (0: the first)")
    retry_at: str | None = Field(
        default=None,
        description="Set when this run failed and another is due: when it is dispatched",
    )


def encode_queued_event(
    *,
    execution_id: str,
    created_at: str,
    project_id: str,
    workflow_id: str,
    deployment_id: str,
    queue_name: str,
    concurrency_key: str | None,
    submission_raw: bytes,
) -> bytes:
    """The ``queued`` LifecycleEvent of a confirmed submission, without building a model
    (the gateway's hot path): the envelope is embedded as it was published."""
    return orjson.dumps(
        {
            "type": "lifecycle",
            "status": "queued",
            "execution_id": execution_id,
            "project_id": project_id,
            "workflow_id": workflow_id,
            "deployment_id": deployment_id,
            "queue_name": queue_name,
            "concurrency_key": concurrency_key,
            "at": created_at,
            "submission": orjson.Fragment(submission_raw),
        }
    )


def encode_lifecycle_event(
    status: ExecutionStatus,
    envelope: SubmissionEnvelope,
    *,
    at: str,
    submission_raw: bytes | None = None,
    with_submission: bool = False,
    dispatch_id: str | None = None,
    worker_id: str | None = None,
    duplicate_of: str | None = None,
    result: Any = None,
    error: ErrorInfo | None = None,
    cancelled_by: str | None = None,
    started_at: str | None = None,
    attempt: int = 0,
    retry_count: int = 0,
    retry_at: str | None = None,
) -> bytes:
    """A ``LifecycleEvent`` without building the model (the dispatcher's hot path: a
    model built and dumped per event was ~12 µs, 17 with the envelope, about 8 % of the
    dispatcher's CPU). The same keys as ``encode(LifecycleEvent(...))``; the submission
    is embedded as it was published (``submission_raw``) when the caller has it
    (tests/test_dispatch_events_encoding.py)."""
    if not with_submission:
        submission: Any = None
    elif submission_raw is not None:
        submission = orjson.Fragment(submission_raw)
    else:
        submission = envelope.model_dump(mode="json")
    # Every field, as the model dumps them: followers of the raw JSON (the live
    # streams) read fields left at their defaults too.
    event: dict[str, Any] = {
        "type": "lifecycle",
        "status": status.value,
        "execution_id": envelope.execution_id,
        "project_id": envelope.project_id,
        "workflow_id": envelope.workflow_id,
        "deployment_id": envelope.deployment_id,
        "queue_name": envelope.queue_name,
        "concurrency_key": envelope.concurrency_key,
        "at": at,
        "dispatch_id": dispatch_id,
        "worker_id": worker_id,
        "duplicate_of": duplicate_of,
        "result": result,
        "error": error.model_dump(mode="json") if error is not None else None,
        "submission": submission,
        "cancelled_by": cancelled_by,
        "started_at": started_at,
        "attempt": attempt,
        "retry_count": retry_count,
        "retry_at": retry_at,
    }
    return orjson.dumps(event)


class EventBatch(_Message):
    """Lifecycle events of one project, many to a message, on ``polos.events``.

    The wire format: ``{"type": "events", "events": [LifecycleEvent, ...]}``,
    routing key ``schemas.topology.event_batch_routing_key(project_id)``. One
    message carries what a publisher had within one flush (an event-loop round,
    a few milliseconds), so each event costs the broker a fraction of an
    enqueue. Events of one execution keep their order across batches (one
    channel per project); they are at-least-once, so followers key them by
    (execution_id, status).
    """

    type: Literal["events"] = "events"
    events: list[LifecycleEvent]


def encode_event_batch(events: Sequence[bytes]) -> bytes:
    """An ``EventBatch`` of events already encoded (``encode``, ``encode_queued_event``),
    joined without decoding them again."""
    return b'{"type":"events","events":[' + b",".join(events) + b"]}"


@dataclass(frozen=True, slots=True)
class DecodedEvents:
    """What a message on ``polos.events`` carried: the events that decoded, each with its
    own JSON text, and the items that did not (the item's JSON text, the reason)."""

    events: list[tuple[LifecycleEvent, bytes]]
    rejected: list[tuple[bytes, str]]


def decode_events(raw: bytes) -> DecodedEvents:
    """A message on ``polos.events``: an ``EventBatch``, or one ``LifecycleEvent`` (as
    published before batches, still queued during an upgrade).

    A bad item inside a batch is rejected alone; raises ``ValueError`` when the
    message as a whole is neither.
    """
    data = orjson.loads(raw)
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "lifecycle":
        return DecodedEvents([(LifecycleEvent.model_validate(data), raw)], [])
    if kind != "events" or not isinstance(data.get("events"), list):
        raise ValueError("neither a lifecycle event nor a batch of them")
    items = data["events"]
    texts = [orjson.dumps(item) for item in items]
    try:
        # The whole batch in one call (a bad item is rare): cheaper than one call each.
        models = _EVENT_LIST.validate_python(items)
        return DecodedEvents(list(zip(models, texts, strict=True)), [])
    except ValidationError:
        pass
    events: list[tuple[LifecycleEvent, bytes]] = []
    rejected: list[tuple[bytes, str]] = []
    for item, text in zip(items, texts, strict=True):
        try:
            events.append((LifecycleEvent.model_validate(item), text))
        except ValidationError as exc:
            rejected.append((text, f"undecodable lifecycle event in a batch: {exc}"))
    return DecodedEvents(events, rejected)


_EVENT_LIST = TypeAdapter(list[LifecycleEvent])


def encode(message: _Message) -> bytes:
    return orjson.dumps(message.model_dump(mode="json"))


def decode_work(raw: bytes) -> WorkMessage:
    return WorkMessage.model_validate_json(raw)


def decode_cancel(raw: bytes) -> CancelMessage:
    return CancelMessage.model_validate_json(raw)


def decode_lifecycle(raw: bytes) -> LifecycleEvent:
    return LifecycleEvent.model_validate_json(raw)
