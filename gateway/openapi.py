"""Our API description: the Polos ``submit_workflow`` operation plus the errors we answer.

Built from the pydantic models in ``schemas.api``, so it cannot drift from
what the handler validates.
"""

from __future__ import annotations

from typing import Any

import orjson

from schemas.api import ErrorBody, SubmitWorkflowRequest, SubmitWorkflowResponse


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        }
    return response


def build_openapi() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (SubmitWorkflowRequest, SubmitWorkflowResponse, ErrorBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Polos Orchestrator API (submission gateway)",
            "version": "1.0.0",
            "description": "Submit durable workflow executions; RabbitMQ-backed.",
        },
        "paths": {
            "/api/v1/workflows/{workflow_id}/run": {
                "post": {
                    "tags": ["Executions"],
                    "summary": "Submit a workflow for execution",
                    "operationId": "submit_workflow",
                    "parameters": [
                        {
                            "name": "workflow_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-Project-ID",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/SubmitWorkflowRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Accepted: the broker confirmed a persistent message",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "$ref": "#/components/schemas/SubmitWorkflowResponse"
                                    }
                                }
                            },
                        },
                        "400": _error("Bad request (malformed JSON, invalid field)"),
                        "401": _error("Missing or invalid API key"),
                        "403": _error("API key bound to another project"),
                        "404": _error("Project, deployment or workflow not found"),
                        "413": _error("Body over the size limit"),
                        "415": _error("Content-Type is not application/json"),
                        "429": _error("Queue at its maximum length", retry_after=True),
                        "503": _error("Broker unavailable or no confirm in time", True),
                    },
                    "security": [{"bearer_auth": []}, {"cookie_auth": []}],
                }
            },
            "/health": {"get": {"summary": "Process is up", "responses": {"200": {}}}},
            "/ready": {
                "get": {
                    "summary": "Broker connected and registry replayed",
                    "responses": {"200": {}, "503": {}},
                }
            },
        },
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
