"""``GET /api/v1/events/stream``: a run's events the way Polos streams them.

    ?workflow_id=W&workflow_run_id=R  (or topic=workflow/W/R)
        [&last_sequence_id=N | Last-Event-ID: N | &last_timestamp=T]
      ─► subscribe to R's events (``Watch``: the recorder's Redis pub/sub), then read R's record
      ─► every event the record shows after the cursor (``schemas.polos_events``), as
         ``id: <sequence_id>`` + ``data: {id, sequence_id, topic, event_type, data, created_at}``
      ─► on each event (published by the recorder once the record has it): read the
         record again, send what is new
      ─► close after the terminal event (or at once if the run ended before the cursor)

The events are derived from the record (one per status reached, numbered in
status order), so any gateway answers the same, and a stream resumes from any
``last_sequence_id`` (or the standard ``Last-Event-ID`` header) without an event
log. ``last_timestamp`` (what the ``polos-sdk`` sends when it has no sequence id:
"now") keeps the events that happened after it. With neither, the stream starts
at the run's first event, as Polos's does.
"""

from __future__ import annotations

import contextlib
import logging
import re
from datetime import datetime

from aiohttp import web

from gateway import errors, sse
from gateway.auth import Principal, api_key_from
from gateway.context import APP_KEYS, APP_SETTINGS, APP_STORE, APP_WATCH
from gateway.executions import EXECUTION_ID_PATTERN, read_record
from schemas.dispatch import TERMINAL_STATUSES
from schemas.polos_events import StreamEvent, run_events
from schemas.records import ExecutionRecord
from store import StoreError

log = logging.getLogger(__name__)

_UUID_RE = re.compile(EXECUTION_ID_PATTERN)
_TOPIC_RE = re.compile(r"^workflow/(?P<workflow_id>.+)/(?P<run_id>[^/]+)$")


class Cursor:
    """Which of a run's events the client has: those up to a sequence id, or a time."""

    def __init__(self, last_sequence_id: int | None, last_timestamp: datetime | None) -> None:
        self.sent = last_sequence_id or 0
        self.after = last_timestamp

    def new(self, events: list[StreamEvent]) -> list[StreamEvent]:
        fresh = [e for e in events if e.sequence_id > self.sent]
        if self.after is not None:
            fresh = [e for e in fresh if _parse_time(e.created_at) > self.after]
        return fresh


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _query(request: web.Request) -> tuple[str, str, Cursor]:
    """(workflow id, run id, cursor) from the query, or a 400 naming every problem."""
    query = request.query
    problems: list[dict[str, str]] = []
    workflow_id = query.get("workflow_id") or None
    run_id = query.get("workflow_run_id") or None
    if run_id is None and (topic := query.get("topic")):
        match = _TOPIC_RE.fullmatch(topic)
        if match is None:
            problems.append(
                {
                    "field": "topic",
                    "message": "only a run's topic is served: workflow/<workflow_id>/<run_id>",
                }
            )
        else:
            workflow_id, run_id = match["workflow_id"], match["run_id"]
    if run_id is None:
        if not problems:
            problems.append({"field": "workflow_run_id", "message": "required (or topic)"})
    elif not _UUID_RE.fullmatch(run_id):
        problems.append({"field": "workflow_run_id", "message": "must be a UUID"})
    if run_id is not None and workflow_id is None:
        problems.append({"field": "workflow_id", "message": "required with workflow_run_id"})
    last_sequence_id: int | None = None
    raw_sequence = query.get("last_sequence_id") or request.headers.get("Last-Event-ID")
    if raw_sequence:
        if raw_sequence.isascii() and raw_sequence.isdigit():
            last_sequence_id = int(raw_sequence)
        else:
            problems.append({"field": "last_sequence_id", "message": "must be an integer >= 0"})
    last_timestamp: datetime | None = None
    if last_sequence_id is None and (raw_time := query.get("last_timestamp")):
        try:
            last_timestamp = _parse_time(raw_time)
        except ValueError:
            problems.append({"field": "last_timestamp", "message": "must be an RFC 3339 time"})
        else:
            if last_timestamp.tzinfo is None:
                problems.append({"field": "last_timestamp", "message": "needs a UTC offset"})
    if problems:
        fields = ", ".join(p["field"] for p in problems)
        raise errors.VALIDATION_ERROR(f"Invalid query parameter(s): {fields}.", problems)
    assert workflow_id is not None
    assert run_id is not None
    return workflow_id, run_id.lower(), Cursor(last_sequence_id, last_timestamp)


def _principal(request: web.Request) -> Principal:
    # The polos-sdk sends the project in the query too; Polos accepts either.
    project_id = request.headers.get("X-Project-ID") or request.query.get("project_id")
    api_key = api_key_from(request.headers.get("Authorization"), request.cookies.get("polos_auth"))
    return request.app[APP_KEYS].authorize(api_key, project_id)


async def stream_events(request: web.Request) -> web.StreamResponse:
    watch = request.app[APP_WATCH]
    principal = _principal(request)
    workflow_id, run_id, cursor = _query(request)
    try:
        subscription = await watch.subscribe(principal.project_id, run_id, principal.key_id)
    except StoreError as exc:
        log.warning("event stream of %s: %s", run_id, exc)
        raise errors.STORE_UNAVAILABLE("The execution store is unavailable; retry later.") from None
    try:
        # Subscribed first, read second: a transition in between wakes us.
        record = await read_record(request, principal.project_id, run_id)
        if record.workflow_id != workflow_id:
            raise errors.EXECUTION_NOT_FOUND(
                f"Execution {run_id!r} is not a run of workflow {workflow_id!r}.",
                [{"field": "workflow_id", "message": "not this run's workflow"}],
            )
        settings = request.app[APP_SETTINGS]
        return await sse.respond(
            request,
            subscription,
            settings.sse_keepalive_seconds,
            lambda follow: _stream(request, follow, record, cursor),
        )
    finally:
        watch.unsubscribe(subscription)


def _sse(event: StreamEvent) -> bytes:
    return b"event: message\nid: %d\ndata: %s\n\n" % (
        event.sequence_id,
        event.model_dump_json().encode(),
    )


async def _send(follow: sse.Follow, record: ExecutionRecord, cursor: Cursor) -> None:
    for event in cursor.new(run_events(record)):
        await follow.write(_sse(event))
        cursor.sent = event.sequence_id


async def _stream(
    request: web.Request, follow: sse.Follow, record: ExecutionRecord, cursor: Cursor
) -> None:
    """The run's events after the cursor, then each new one, until the terminal one."""
    store = request.app[APP_STORE]
    subscription = follow.subscription
    await _send(follow, record, cursor)
    while record.status not in TERMINAL_STATUSES:
        if await follow.next() is None:
            return
        # An event (or RESYNC after a lost connection): the record has it; it says what
        # is new, and a repeat (events are at-least-once) adds nothing.
        with contextlib.suppress(StoreError):
            latest = await store.get(subscription.project_id, subscription.execution_id)
            if latest is not None and latest != record:
                record = latest
                await _send(follow, record, cursor)
