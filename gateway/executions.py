"""The execution API: what became of an execution, cancelling it, its live events, and
a workflow's recent runs.

Reads come from the execution store (Redis, written by the recorders); Redis
away answers 503 here and changes nothing for submissions. A cancel is a
message to the owner of the execution's queue (``CancelRequest`` on its results
queue); the owner ends the execution and the record follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid

from aiohttp import web

from broker.errors import BrokerError, Unroutable
from broker.topology import declare_results_queue
from gateway import errors, sse
from gateway.auth import Principal, api_key_from
from gateway.context import APP_KEYS, APP_LINK, APP_SETTINGS, APP_STORE, APP_WATCH
from gateway.errors import ApiError
from gateway.settings import Settings
from gateway.submission import require_broker, unavailable
from gateway.watch import Signal
from schemas.api import CancelExecutionResponse
from schemas.dispatch import TERMINAL_STATUSES, CancelRequest, ExecutionStatus, encode
from schemas.ids import now_rfc3339, uuid7_time_ms
from schemas.records import ExecutionRecord, WorkflowRunsResponse
from schemas.topology import results_queue
from store import MAX_LIST_LIMIT, InvalidCursor, StoreBusy, StoreError
from store.layout import rank

log = logging.getLogger(__name__)

EXECUTION_ID_PATTERN = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_UUID_RE = re.compile(EXECUTION_ID_PATTERN)
_JSON = "application/json"
DEFAULT_LIST_LIMIT = 50


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


# Set by the operator page's routes (gateway/operator.py), which check the admin key
# and name the project themselves.
OPERATOR_PRINCIPAL = web.RequestKey("operator_principal", Principal)


def _principal(request: web.Request) -> Principal:
    if OPERATOR_PRINCIPAL in request:
        return request[OPERATOR_PRINCIPAL]
    api_key = api_key_from(request.headers.get("Authorization"), request.cookies.get("polos_auth"))
    return request.app[APP_KEYS].authorize(api_key, request.headers.get("X-Project-ID"))


def _execution_id(request: web.Request) -> str:
    value = request.match_info["execution_id"]
    if not _UUID_RE.fullmatch(value):
        raise errors.INVALID_EXECUTION_ID(
            "The execution id is not a UUID.",
            [{"field": "execution_id", "message": "must be a UUID"}],
        )
    return value.lower()


def _store_unavailable(settings: Settings, exc: StoreError | None = None) -> ApiError:
    if isinstance(exc, StoreBusy):
        message = (
            "No connection to the execution store came free within "
            f"{settings.redis_pool_timeout_seconds:g} s (too many reads at once); retry later."
        )
    else:
        message = "The execution store is unavailable; retry later."
    return errors.STORE_UNAVAILABLE(message)


def _not_found(execution_id: str) -> ApiError:
    return errors.EXECUTION_NOT_FOUND(f"Execution {execution_id!r} not found.")


async def _read(request: web.Request, project_id: str, execution_id: str) -> ExecutionRecord:
    """The record; 404 if there is none, 503 if the store is away.

    A submission's record is written a few milliseconds after its 200 (its
    ``queued`` event goes through the broker and a recorder), and clients read
    right after submitting. So a miss for an id minted moments ago looks again
    for up to ``record_wait_seconds`` before it is a 404.
    """
    app = request.app
    settings, store = app[APP_SETTINGS], app[APP_STORE]
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    while True:
        try:
            record = await store.get(project_id, execution_id)
        except StoreError as exc:
            log.warning("execution store: %s", exc)
            raise _store_unavailable(settings, exc) from None
        if record is not None:
            return record
        if deadline is None:
            if not _minted_lately(execution_id, RECENT_ID_SECONDS):
                raise _not_found(execution_id)
            deadline = loop.time() + settings.record_wait_seconds
        if loop.time() >= deadline:
            raise _not_found(execution_id)
        await asyncio.sleep(0.01)


# The other streams (gateway/run_events.py) read records the same way.
read_record = _read

# An id minted longer ago than this (by its UUIDv7 clock) is not waited for.
RECENT_ID_SECONDS = 10.0


def _minted_lately(execution_id: str, seconds: float) -> bool:
    value = uuid.UUID(execution_id)
    if value.version != 7:
        return False
    return abs(time.time() * 1000 - uuid7_time_ms(value)) <= seconds * 1000


# -- GET /api/v1/executions/{execution_id} -------------------------------------------


async def get_execution(request: web.Request) -> web.Response:
    principal = _principal(request)
    record = await _read(request, principal.project_id, _execution_id(request))
    return _json(record.model_dump_json().encode())


# -- POST /api/v1/executions/{execution_id}/cancel -----------------------------------


async def cancel_execution(request: web.Request) -> web.Response:
    app = request.app
    settings, link = app[APP_SETTINGS], app[APP_LINK]
    principal = _principal(request)
    execution_id = _execution_id(request)
    record = await _read(request, principal.project_id, execution_id)
    if record.status in TERMINAL_STATUSES:
        raise _terminal(record)
    require_broker(link)
    publisher = link.publisher
    assert publisher is not None
    request_message = CancelRequest(
        execution_id=execution_id,
        requested_by=principal.key_id,
        at=now_rfc3339(),
        seen_status=record.status,
    )
    inbox = results_queue(principal.project_id, record.queue_name or record.workflow_id)
    body = encode(request_message)
    message_id = f"{execution_id}/cancel"
    try:
        try:
            await publisher.publish(inbox, body, message_id=message_id)
        except Unroutable:
            # No dispatcher has owned the queue yet: its inbox is declared as the
            # owner declares it, and the request waits there for the first one.
            assert link.connection is not None
            await declare_results_queue(link.connection, inbox, replicas=settings.quorum_group_size)
            await publisher.publish(inbox, body, message_id=message_id)
    except BrokerError as exc:
        log.warning("cancel of %s not published: %s", execution_id, exc)
        raise unavailable("The message broker did not take the cancel request.") from None

    record = await _await_cancelled(request, principal.project_id, record, settings)
    if record.status is ExecutionStatus.CANCELLED:
        status = 200
    elif record.status in TERMINAL_STATUSES:
        raise _terminal(record)  # it ended otherwise before the request reached its owner
    else:
        status = 202
    answer = CancelExecutionResponse(
        execution_id=execution_id, status=record.status, cancelled_at=record.cancelled_at
    )
    return _json(answer.model_dump_json().encode(), status)


def _terminal(record: ExecutionRecord) -> ApiError:
    return errors.EXECUTION_TERMINAL(
        f"Execution {record.id!r} is already {record.status.value}.",
        [{"field": "status", "message": record.status.value}],
    )


async def _await_cancelled(
    request: web.Request, project_id: str, record: ExecutionRecord, settings: Settings
) -> ExecutionRecord:
    """The record once terminal, or as it is when ``cancel_wait_seconds`` have passed."""
    store = request.app[APP_STORE]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.cancel_wait_seconds
    delay = 0.02
    while record.status not in TERMINAL_STATUSES and loop.time() < deadline:
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 1.5, 0.2)
        try:
            latest = await store.get(project_id, record.id)
        except StoreError:
            break  # the request is on its way all the same: 202 with what we know
        if latest is not None:
            record = latest
    return record


# -- GET /api/v1/executions/{execution_id}/events ------------------------------------


async def execution_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, watch = app[APP_SETTINGS], app[APP_WATCH]
    principal = _principal(request)
    execution_id = _execution_id(request)
    try:
        subscription = await watch.subscribe(principal.project_id, execution_id, principal.key_id)
    except StoreError as exc:
        log.warning("event stream of %s: %s", execution_id, exc)
        raise _store_unavailable(settings, exc) from None
    try:
        # Subscribed first, read second: an event in between is in the inbox.
        record = await _read(request, principal.project_id, execution_id)
        return await sse.respond(
            request,
            subscription,
            settings.sse_keepalive_seconds,
            lambda follow: _stream(request, follow, record),
        )
    finally:
        watch.unsubscribe(subscription)


def _sse(event: str, event_id: str, data: bytes) -> bytes:
    return b"event: %s\nid: %s\ndata: %s\n\n" % (event.encode(), event_id.encode(), data)


async def _stream(request: web.Request, follow: sse.Follow, record: ExecutionRecord) -> None:
    """The record, then each newer event, until a terminal one or the client leaves."""
    store = request.app[APP_STORE]
    execution_id = record.id
    await follow.write(_sse("record", f"{execution_id}/{record.status.value}", _record(record)))
    seen: set[str] = {record.status}
    current = rank(record.status)
    while record.status not in TERMINAL_STATUSES:
        if (item := await follow.next()) is None:
            return
        if isinstance(item, Signal):
            # RESYNC: events may have been missed while Redis was out of reach.
            with contextlib.suppress(StoreError):
                latest = await store.get(follow.subscription.project_id, execution_id)
                if latest is not None and rank(latest.status) > current:
                    record, current = latest, rank(latest.status)
                    seen.add(record.status)
                    data = _record(record)
                    await follow.write(
                        _sse("record", f"{execution_id}/{record.status.value}", data)
                    )
            continue
        event, raw = item
        # One event per status, and one per failed run that is retried (its status stays
        # running); not what the record already showed, nor a repeat (at-least-once).
        step = f"retry/{event.retry_count}" if event.retry_at is not None else event.status.value
        if step in seen or rank(event.status) < current:
            continue
        seen.add(step)
        current = max(current, rank(event.status))
        await follow.write(_sse("lifecycle", f"{execution_id}/{step}", raw))
        if event.status in TERMINAL_STATUSES:
            return


def _record(record: ExecutionRecord) -> bytes:
    return record.model_dump_json().encode()


# -- GET /api/v1/workflows/{workflow_id}/runs ----------------------------------------


async def workflow_runs(request: web.Request) -> web.Response:
    app = request.app
    principal = _principal(request)
    workflow_id = request.match_info["workflow_id"]
    query = request.query
    problems: list[dict[str, str]] = []
    status: ExecutionStatus | None = None
    # An empty status is not "any status": it is no status there is.
    if (raw_status := query.get("status")) is not None:
        try:
            status = ExecutionStatus(raw_status)
        except ValueError:
            choices = ", ".join(s.value for s in ExecutionStatus)
            problems.append({"field": "status", "message": f"must be one of {choices}"})
    limit = DEFAULT_LIST_LIMIT
    if (raw_limit := query.get("limit")) is not None:
        if raw_limit.isdigit() and 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            limit = int(raw_limit)
        else:
            problems.append(
                {"field": "limit", "message": f"must be an integer from 1 to {MAX_LIST_LIMIT}"}
            )
    if problems:
        fields = ", ".join(p["field"] for p in problems)
        raise errors.VALIDATION_ERROR(f"Invalid query parameter(s): {fields}.", problems)
    try:
        records, cursor = await app[APP_STORE].list_runs(
            principal.project_id, workflow_id, status, limit, query.get("cursor") or None
        )
    except InvalidCursor:
        raise errors.VALIDATION_ERROR(
            "Invalid query parameter(s): cursor.",
            [{"field": "cursor", "message": "not a cursor this API returned"}],
        ) from None
    except StoreError as exc:
        log.warning("execution store: %s", exc)
        raise _store_unavailable(app[APP_SETTINGS], exc) from None
    page = WorkflowRunsResponse(executions=records, next_cursor=cursor)
    return _json(page.model_dump_json().encode())
