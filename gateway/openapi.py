"""Our API description: the Polos ``submit_workflow`` operation, the execution API
(status, cancel, live events, runs, batch submit) and the errors we answer.

Built from the pydantic models in ``schemas``, so it cannot drift from what the
handlers validate and answer.
"""

from __future__ import annotations

from typing import Any

import orjson

from schemas.api import (
    IDEMPOTENCY_KEY_PATTERN,
    BatchRunRequest,
    BatchRunResponse,
    CancelExecutionResponse,
    ErrorBody,
    SubmitWorkflowRequest,
    SubmitWorkflowResponse,
)
from schemas.dispatch import ExecutionStatus, LifecycleEvent
from schemas.records import ExecutionRecord, WorkflowRunsResponse
from store import MAX_LIST_LIMIT

_MODELS = (
    SubmitWorkflowRequest,
    SubmitWorkflowResponse,
    BatchRunRequest,
    BatchRunResponse,
    ExecutionRecord,
    WorkflowRunsResponse,
    CancelExecutionResponse,
    LifecycleEvent,
    ErrorBody,
)
_SECURITY: list[dict[str, list[str]]] = [{"bearer_auth": []}, {"cookie_auth": []}]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response = _json(description, "ErrorBody")
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        }
    return response


def _path(name: str, description: str = "") -> dict[str, Any]:
    parameter: dict[str, Any] = {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    if description:
        parameter["description"] = description
    return parameter


_PROJECT = {"name": "X-Project-ID", "in": "header", "required": True, "schema": {"type": "string"}}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1-255 visible ASCII characters. The same key with the same request in "
    "this project within the retention window (24 h by default) answers the same execution "
    "(with Idempotent-Replayed: true) and publishes nothing. Needs the execution store.",
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
}
_IDEMPOTENCY_ERRORS = {
    "409": _error(
        "IDEMPOTENCY_KEY_IN_PROGRESS: another request with the key is still being submitted",
        retry_after=True,
    ),
    "422": _error("IDEMPOTENCY_KEY_REUSED: the key was used with a different request"),
}
_EXECUTION = _path("execution_id", "Execution ID (a UUID); another project's is not found")

_AUTH_ERRORS = {
    "401": _error("Missing or invalid API key"),
    "403": _error("API key bound to another project"),
}
_STORE_DOWN = _error("The execution store (Redis) is unavailable", retry_after=True)

_SUBMIT_ERRORS = {
    "400": _error("Bad request (malformed JSON, invalid field)"),
    **_AUTH_ERRORS,
    "404": _error("Project, deployment or workflow not found"),
    "413": _error("Body over the size limit"),
    "415": _error("Content-Type is not application/json"),
    "429": _error("Queue at its maximum length", retry_after=True),
    "503": _error(
        "Broker unavailable or no confirm in time; or, for a request with an idempotency "
        "key, the execution store (STORE_UNAVAILABLE)",
        True,
    ),
    **_IDEMPOTENCY_ERRORS,
}


def _operation(
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    responses: dict[str, Any],
    *,
    description: str = "",
    body: str | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": ["Executions"],
        "summary": summary,
        "operationId": operation_id,
        "parameters": [*parameters, _PROJECT],
        "responses": responses,
        "security": _SECURITY,
    }
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _paths() -> dict[str, Any]:
    return {
        "/api/v1/workflows/{workflow_id}/run": {
            "post": _operation(
                "submit_workflow",
                "Submit a workflow for execution",
                [_path("workflow_id"), _IDEMPOTENCY_KEY],
                {
                    "200": _json(
                        "Accepted: the broker confirmed a persistent message",
                        "SubmitWorkflowResponse",
                    ),
                    **_SUBMIT_ERRORS,
                },
                body="SubmitWorkflowRequest",
            )
        },
        "/api/v1/workflows/batch_run": {
            "post": _operation(
                "batch_run_workflows",
                "Submit several workflows at once",
                [
                    {
                        **_IDEMPOTENCY_KEY,
                        "description": "Keys every item without an idempotency_key of its own "
                        "as item <index> of this batch: the same batch again answers as before "
                        "and publishes only items no earlier attempt published.",
                    }
                ],
                {
                    "200": _json(
                        "Every workflow accepted (each confirmed by the broker); one entry per "
                        "requested workflow, in request order",
                        "BatchRunResponse",
                    ),
                    **_SUBMIT_ERRORS,
                    "400": _error(
                        "Some item is invalid (details name it: workflows.<index>.<field>), or "
                        "more items than the configured maximum; nothing was published"
                    ),
                    "404": _error(
                        "The deployment, or an item's workflow, is not found (details name the "
                        "item); nothing was published"
                    ),
                    "503": _error(
                        "Some items were not confirmed (BATCH_INCOMPLETE): details say, per "
                        "item, which were accepted (they run) and which were not; or the "
                        "broker is unavailable",
                        True,
                    ),
                },
                description="Validated as a whole: one invalid item and nothing is published. "
                "All items are published with their confirms in flight at once; 200 only once "
                "every one is confirmed. Fields an item leaves out take the batch's value.",
                body="BatchRunRequest",
            )
        },
        "/api/v1/workflows/{workflow_id}/runs": {
            "get": _operation(
                "list_workflow_runs",
                "The project's recent executions of a workflow, newest first",
                [
                    _path("workflow_id"),
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": [s.value for s in ExecutionStatus]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIST_LIMIT,
                            "default": 50,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "description": "next_cursor of the previous page",
                        "schema": {"type": "string"},
                    },
                ],
                {
                    "200": _json("A page of runs", "WorkflowRunsResponse"),
                    "400": _error("Bad status, limit or cursor"),
                    **_AUTH_ERRORS,
                    "503": _STORE_DOWN,
                },
            )
        },
        "/api/v1/executions/{execution_id}": {
            "get": _operation(
                "get_execution",
                "What became of an execution",
                [_EXECUTION],
                {
                    "200": _json(
                        "The execution (Polos ExecutionResponse fields, plus ours)",
                        "ExecutionRecord",
                    ),
                    "400": _error("The execution id is not a UUID"),
                    **_AUTH_ERRORS,
                    "404": _error("No such execution in this project"),
                    "503": _STORE_DOWN,
                },
            )
        },
        "/api/v1/executions/{execution_id}/cancel": {
            "post": _operation(
                "cancel_execution",
                "Cancel an execution",
                [_EXECUTION],
                {
                    "200": _json("Cancelled", "CancelExecutionResponse"),
                    "202": _json(
                        "Requested but not done yet (e.g. it is still queued: it ends cancelled "
                        "when it reaches the head of its queue, without running); status is "
                        "the current one",
                        "CancelExecutionResponse",
                    ),
                    "400": _error("The execution id is not a UUID"),
                    **_AUTH_ERRORS,
                    "404": _error("No such execution in this project"),
                    "409": _error(
                        "Already terminal; details give the status "
                        '([{"field": "status", "message": "<status>"}])'
                    ),
                    "503": _error("The execution store or the broker is unavailable", True),
                },
                description="A running execution is cancelled on its worker and frees its slot "
                "and concurrency key; a queued one never runs.",
            )
        },
        "/api/v1/executions/{execution_id}/events": {
            "get": _operation(
                "execution_events",
                "Server-Sent Events of an execution's lifecycle",
                [_EXECUTION],
                {
                    "200": {
                        "description": "An event stream: first `event: record` (data: the "
                        "ExecutionRecord as it is now), then one `event: lifecycle` per "
                        "transition (data: a LifecycleEvent); `id` is "
                        "`<execution_id>/<status>`. It closes after the terminal status. "
                        "Comment lines (`: keep-alive`) while idle.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": _error("The execution id is not a UUID"),
                    **_AUTH_ERRORS,
                    "404": _error("No such execution in this project"),
                    "503": _error("The execution store or the broker is unavailable", True),
                },
            )
        },
        "/health": {"get": {"summary": "Process is up", "responses": {"200": {}}}},
        "/ready": {
            "get": {
                "summary": "Broker connected and registry replayed",
                "responses": {"200": {}, "503": {}},
            }
        },
    }


def build_openapi() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Polos Orchestrator API (submission gateway)",
            "version": "1.0.0",
            "description": "Submit durable workflow executions and follow them; RabbitMQ-backed.",
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer_auth": {"type": "http", "scheme": "bearer"},
                "cookie_auth": {"type": "apiKey", "in": "cookie", "name": "polos_auth"},
            },
        },
    }


def openapi_json() -> bytes:
    return orjson.dumps(build_openapi())
