"""Every route of the gateway, declared once: ``create_app`` serves this table and
``gateway.openapi`` describes it, so nothing is served undescribed or described
otherwise than it answers.

A route is one ``Route(...)`` in ``ROUTES``: method, path, handler, summary,
what it answers on success (``Answer``: a model, an event stream, or a raw
schema) and the error kinds of ``gateway.errors`` its handler raises. The
kinds every route can meet are added here, not repeated per route: HTTP
framing and limits on all of them, authentication where ``auth`` (the
default), the body's on routes that take one (``body=Model``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway import errors, executions, handlers, run_events
from gateway.errors import ErrorKind
from schemas.api import (
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    BatchRunRequest,
    BatchRunResponse,
    CancelExecutionResponse,
    HealthResponse,
    ReadinessResponse,
    SubmitWorkflowRequest,
    SubmitWorkflowResponse,
)
from schemas.dispatch import ExecutionStatus, LifecycleEvent
from schemas.polos_events import StreamEvent
from schemas.records import ExecutionRecord, WorkflowRunsResponse
from store import MAX_LIST_LIMIT

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Answer:
    """A success response: a JSON model, an event stream (``events``: name → data
    model), or any other media type with a raw ``schema``."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    events: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: str = "path"  # or "query"
    description: str = ""
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = True


# Met before, or outside, any handler (gateway/server.py, the error middleware).
HTTP_ERRORS = (
    errors.BAD_HTTP_REQUEST,
    errors.REQUEST_TIMEOUT,
    errors.URI_TOO_LONG,
    errors.HEADERS_TOO_LARGE,
    errors.EXPECTATION_FAILED,
    errors.INTERNAL_ERROR,
    errors.TOO_MANY_CONNECTIONS,
)
AUTH_ERRORS = (
    errors.MISSING_PROJECT_ID,
    errors.UNAUTHORIZED,
    errors.FORBIDDEN,
    errors.PROJECT_NOT_FOUND,
)
BODY_ERRORS = (
    errors.INVALID_JSON,
    errors.INVALID_REQUEST,
    errors.VALIDATION_ERROR,
    errors.PAYLOAD_TOO_LARGE,
    errors.UNSUPPORTED_MEDIA_TYPE,
    errors.UNSUPPORTED_CONTENT_ENCODING,
)


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    answers: Mapping[int, Answer]
    errors: tuple[ErrorKind, ...] = ()
    body: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    auth: bool = True  # API key and X-Project-ID
    description: str = ""
    tag: str = "Executions"
    documented: bool = True  # in /openapi.json

    def error_kinds(self) -> tuple[ErrorKind, ...]:
        """Every error kind this route can answer, without repeats."""
        kinds = (
            *HTTP_ERRORS,
            *(AUTH_ERRORS if self.auth else ()),
            *(BODY_ERRORS if self.body is not None else ()),
            *self.errors,
        )
        return tuple(dict.fromkeys(kinds))


_EXECUTION_ID = Param(
    "execution_id",
    description="Execution ID (a UUID); another project's is not found",
    schema={"type": "string", "pattern": executions.EXECUTION_ID_PATTERN},
)
_SUBMIT_ERRORS = (
    errors.DEPLOYMENT_NOT_FOUND,
    errors.WORKFLOW_NOT_FOUND,
    errors.QUEUE_FULL,
    errors.BROKER_UNAVAILABLE,
)
# A submission with an Idempotency-Key (gateway/idempotency.py).
_IDEMPOTENCY_ERRORS = (
    errors.INVALID_IDEMPOTENCY_KEY,
    errors.IDEMPOTENCY_KEY_IN_PROGRESS,
    errors.IDEMPOTENCY_KEY_REUSED,
    errors.STORE_UNAVAILABLE,
)
_IDEMPOTENCY_KEY = Param(
    IDEMPOTENCY_KEY_HEADER,
    "header",
    "The same key with the same request in this project within the retention window (24 h "
    "by default) answers the same execution (header Idempotent-Replayed: true) and publishes "
    "nothing; with another request it is a 422. Needs the execution store (503 without it).",
    schema={"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    required=False,
)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/api/v1/workflows/{workflow_id}/run",
        handlers.submit_workflow,
        "submit_workflow",
        "Submit a workflow for execution",
        {
            200: Answer(
                "Accepted: the broker confirmed a persistent message", SubmitWorkflowResponse
            )
        },
        (*_SUBMIT_ERRORS, *_IDEMPOTENCY_ERRORS),
        body=SubmitWorkflowRequest,
        params=(Param("workflow_id", description="Workflow ID to execute"), _IDEMPOTENCY_KEY),
    ),
    Route(
        "POST",
        "/api/v1/workflows/batch_run",
        handlers.batch_run,
        "batch_run_workflows",
        "Submit several workflows at once",
        {
            200: Answer(
                "Every workflow accepted (each confirmed by the broker); one entry per "
                "requested workflow, in request order",
                BatchRunResponse,
            )
        },
        (
            *_SUBMIT_ERRORS,
            errors.BATCH_QUEUE_FULL,
            errors.BATCH_INCOMPLETE,
            *_IDEMPOTENCY_ERRORS,
        ),
        body=BatchRunRequest,
        params=(
            Param(
                IDEMPOTENCY_KEY_HEADER,
                "header",
                "Keys each item without an idempotency_key of its own as item <index> of "
                "this batch: the same batch again answers as before and publishes only the "
                "items no earlier attempt published.",
                schema={"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                required=False,
            ),
        ),
        description="Validated as a whole: one invalid item (details name it: "
        "workflows.<index>.<field>), more items than the configured maximum, or an unknown "
        "deployment or workflow, and nothing is published. All items are published with their "
        "confirms in flight at once; 200 only once every one is confirmed. Fields an item "
        "leaves out take the batch's value.",
    ),
    Route(
        "GET",
        "/api/v1/workflows/{workflow_id}/runs",
        executions.workflow_runs,
        "list_workflow_runs",
        "The project's recent executions of a workflow, newest first",
        {200: Answer("A page of runs", WorkflowRunsResponse)},
        (errors.VALIDATION_ERROR, errors.STORE_UNAVAILABLE),
        params=(
            Param("workflow_id"),
            Param(
                "status",
                "query",
                schema={"type": "string", "enum": [s.value for s in ExecutionStatus]},
                required=False,
            ),
            Param(
                "limit",
                "query",
                schema={"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 50},
                required=False,
            ),
            Param("cursor", "query", "next_cursor of the previous page", required=False),
        ),
    ),
    Route(
        "GET",
        "/api/v1/executions/{execution_id}",
        executions.get_execution,
        "get_execution",
        "What became of an execution",
        {200: Answer("The execution (Polos ExecutionResponse fields, plus ours)", ExecutionRecord)},
        (errors.INVALID_EXECUTION_ID, errors.EXECUTION_NOT_FOUND, errors.STORE_UNAVAILABLE),
        params=(_EXECUTION_ID,),
    ),
    Route(
        "POST",
        "/api/v1/executions/{execution_id}/cancel",
        executions.cancel_execution,
        "cancel_execution",
        "Cancel an execution",
        {
            200: Answer("Cancelled", CancelExecutionResponse),
            202: Answer(
                "Requested but not done yet (e.g. it is still queued: it ends cancelled when it "
                "reaches the head of its queue, without running); status is the current one",
                CancelExecutionResponse,
            ),
        },
        (
            errors.INVALID_EXECUTION_ID,
            errors.EXECUTION_NOT_FOUND,
            errors.EXECUTION_TERMINAL,
            errors.STORE_UNAVAILABLE,
            errors.BROKER_UNAVAILABLE,
        ),
        params=(_EXECUTION_ID,),
        description="A running execution is cancelled on its worker and frees its slot and "
        "concurrency key; a queued one never runs.",
    ),
    Route(
        "GET",
        "/api/v1/executions/{execution_id}/events",
        executions.execution_events,
        "execution_events",
        "Server-Sent Events of an execution's lifecycle",
        {
            200: Answer(
                "An event stream: first `event: record` (data: the ExecutionRecord as it is "
                "now), then one `event: lifecycle` per transition (data: a LifecycleEvent); "
                "`id` is `<execution_id>/<status>`. It closes after the terminal status, when "
                "the key is revoked, or when the gateway shuts down. Comment lines "
                "(`: keep-alive`) while idle.",
                media_type="text/event-stream",
                events={"record": ExecutionRecord, "lifecycle": LifecycleEvent},
            )
        },
        # Live events come from Redis now (the recorder's pub/sub), not from the broker.
        (errors.INVALID_EXECUTION_ID, errors.EXECUTION_NOT_FOUND, errors.STORE_UNAVAILABLE),
        params=(_EXECUTION_ID,),
    ),
    Route(
        "GET",
        "/api/v1/events/stream",
        run_events.stream_events,
        "stream_events",
        "Server-Sent Events of a run, as Polos streams them (polos-sdk stream_workflow)",
        {
            200: Answer(
                "An event stream: one `data:` per event of the run after the cursor (a "
                "StreamEvent: id, sequence_id, topic, event_type, data, created_at), `id` its "
                "sequence_id; one event per status the run reached (workflow_queued, "
                "workflow_admitted, workflow_start, then workflow_finish, workflow_failed, "
                "workflow_timed_out, workflow_cancel or workflow_deduplicated). It closes after "
                "the terminal event (at once if the run ended before the cursor). Comment "
                "lines (`: keep-alive`) while idle.",
                media_type="text/event-stream",
                events={"message": StreamEvent},
            )
        },
        (errors.VALIDATION_ERROR, errors.EXECUTION_NOT_FOUND, errors.STORE_UNAVAILABLE),
        params=(
            # Described as the polos-sdk sends them; `topic=workflow/<workflow_id>/<run_id>`
            # is also accepted in their place (Polos's other form), undescribed.
            Param(
                "workflow_id",
                "query",
                "The run's workflow",
                schema={"type": "string", "minLength": 1},
            ),
            Param(
                "workflow_run_id",
                "query",
                "The run (execution id, a UUID)",
                schema={
                    "type": "string",
                    "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                    "[0-9a-fA-F]{12}$",
                },
            ),
            Param(
                "last_sequence_id",
                "query",
                "Resume after this event (or the Last-Event-ID header)",
                schema={"type": "integer", "minimum": 0},
                required=False,
            ),
            Param(
                "last_timestamp",
                "query",
                "Without last_sequence_id: only events after this time (RFC 3339)",
                required=False,
            ),
            Param(
                "project_id",
                "query",
                "The project, when X-Project-ID is not sent",
                required=False,
            ),
        ),
        description="Polos's path and event shape; the events of one of our runs are the "
        "transitions of its record, so any gateway answers the same and a stream resumes "
        "from any sequence id.",
        tag="Events",
    ),
    Route(
        "GET",
        "/health",
        handlers.health,
        "health",
        "Process is up",
        {200: Answer("Up", HealthResponse)},
        auth=False,
        tag="Health",
    ),
    Route(
        "GET",
        "/ready",
        handlers.ready,
        "ready",
        "Broker connected and registry replayed",
        {
            200: Answer("Ready", ReadinessResponse),
            503: Answer("Not ready: what is missing", ReadinessResponse),
        },
        auth=False,
        tag="Health",
    ),
    Route(
        "GET",
        "/openapi.json",
        handlers.openapi,
        "openapi",
        "This API description",
        {200: Answer("OpenAPI 3.1 document", schema={"type": "object"})},
        auth=False,
        tag="Health",
    ),
)


def add_routes(app: web.Application, routes: tuple[Route, ...] = ROUTES) -> None:
    for route in routes:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)  # and HEAD
        else:
            app.router.add_route(route.method, route.path, route.handler)
