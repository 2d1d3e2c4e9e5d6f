"""``/openapi.json``, generated from the route table (``gateway.routes``) and the
pydantic models in ``schemas``: what the app serves, validates and answers is
what this describes.

Each error status of an operation lists the error kinds (``gateway.errors``)
behind it, with ``Retry-After`` or ``WWW-Authenticate`` where the kind sets
them. An event stream is described per event, as OpenAPI 3.1 tools read
``text/event-stream`` (schemathesis, like 3.2's ``itemSchema``): an object
with ``event``, ``id`` and ``data``, the JSON in ``data`` given by
``contentMediaType``/``contentSchema``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from pydantic import BaseModel

from gateway.errors import ErrorKind
from gateway.routes import Answer, Route
from gateway.settings import Settings
from schemas.api import QUEUE_NAME_PATTERN, ErrorBody

_SECURITY: list[dict[str, list[str]]] = [{"bearer_auth": []}, {"cookie_auth": []}]
_PROJECT = {
    "name": "X-Project-ID",
    "in": "header",
    "description": "Project ID",
    "required": True,
    "schema": {"type": "string"},
}
_HEADER_DOCS = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer"},
    },
    "WWW-Authenticate": {"description": "The Bearer scheme", "schema": {"type": "string"}},
    "Allow": {"description": "Methods the path allows", "schema": {"type": "string"}},
}
_PATH_PARAM = re.compile(r"\{([^}]+)\}")


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_schema(events: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """One server-sent event: which ``event`` it is says what its ``data`` holds."""
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "id": {"type": "string"},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": _ref(model),
                    },
                },
            }
            for name, model in events.items()
        ]
    }


def _answer_schema(answer: Answer) -> dict[str, Any]:
    if answer.events:
        return _event_schema(answer.events)
    if answer.model is not None:
        return _ref(answer.model)
    return dict(answer.schema or {})


def _error_description(kinds: Sequence[ErrorKind]) -> str:
    return "; ".join(f"{kind.error_type}: {kind.meaning}" for kind in kinds)


def _responses(route: Route) -> dict[str, Any]:
    by_status: dict[int, list[ErrorKind]] = defaultdict(list)
    for kind in route.error_kinds():
        by_status[kind.status].append(kind)
    responses: dict[str, Any] = {}
    for status in sorted({*route.answers, *by_status}):
        answer = route.answers.get(status)
        kinds = by_status.get(status, [])
        descriptions = [answer.description] if answer is not None else []
        if kinds:
            descriptions.append(_error_description(kinds))
        content: dict[str, Any] = {}
        if answer is not None:
            content[answer.media_type] = {"schema": _answer_schema(answer)}
        if kinds:
            error = _ref(ErrorBody)
            json = content.get("application/json")
            # A status that is an answer and an error (503 of /ready) is either shape.
            schema = {"anyOf": [json["schema"], error]} if json else error
            content["application/json"] = {"schema": schema}
        response: dict[str, Any] = {"description": " | ".join(descriptions), "content": content}
        headers = _error_headers(kinds)
        if status == 405:
            headers["Allow"] = _HEADER_DOCS["Allow"]
        if headers:
            response["headers"] = headers
        responses[str(status)] = response
    return responses


def _error_headers(kinds: Iterable[ErrorKind]) -> dict[str, Any]:
    names = {name for kind in kinds for name in kind.headers}
    if any(kind.retry for kind in kinds):
        names.add("Retry-After")
    return {name: _HEADER_DOCS[name] for name in sorted(names)}


def _parameters(route: Route) -> list[dict[str, Any]]:
    declared = {p.name for p in route.params if p.where == "path"}
    in_path = set(_PATH_PARAM.findall(route.path))
    if declared != in_path:
        raise ValueError(f"{route.path}: path parameters {sorted(in_path)}, declared {declared}")
    parameters = []
    for param in route.params:
        parameter: dict[str, Any] = {
            "name": param.name,
            "in": param.where,
            "required": param.required or param.where == "path",
            "schema": dict(param.schema),
        }
        if param.description:
            parameter["description"] = param.description
        parameters.append(parameter)
    if route.auth:
        parameters.append(_PROJECT)
    return parameters


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": [route.tag],
        "summary": route.summary,
        "operationId": route.operation_id,
    }
    if route.description:
        operation["description"] = route.description
    parameters = _parameters(route)
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(route.body)}},
        }
    operation["responses"] = _responses(route)
    if route.auth:
        operation["security"] = _SECURITY
    return operation


def _models(routes: Sequence[Route]) -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = [ErrorBody]
    for route in routes:
        if route.body is not None:
            models.append(route.body)
        for answer in route.answers.values():
            if answer.model is not None:
                models.append(answer.model)
            models.extend(answer.events.values())
    return list(dict.fromkeys(models))


def _narrow(schemas: dict[str, Any], model: str, field: str, **bounds: Any) -> None:
    """Add ``bounds`` to a model's field (to its non-null variant if it may be null)."""
    if model not in schemas:
        return
    prop = schemas[model]["properties"][field]
    for variant in prop.get("anyOf", [prop]):
        if variant.get("type") != "null":
            variant.update(bounds)


def _gateway_rules(schemas: dict[str, Any], settings: Settings) -> None:
    """What this gateway's settings and its own checks (gateway/submission.py) add to
    the models' constraints, so the description says what it accepts."""
    for model in ("SubmitWorkflowRequest", "BatchWorkflowItem"):
        _narrow(schemas, model, "run_timeout_seconds", maximum=settings.max_run_timeout_seconds)
    _narrow(schemas, "BatchRunRequest", "workflows", maxItems=settings.max_batch_items)
    if "BatchWorkflowItem" in schemas:
        # Without a queue_name the workflow id names the queue, so it must be a valid one.
        schemas["BatchWorkflowItem"]["anyOf"] = [
            {"required": ["queue_name"], "properties": {"queue_name": {"type": "string"}}},
            {"properties": {"workflow_id": {"pattern": QUEUE_NAME_PATTERN}}},
        ]


def build_openapi(routes: Sequence[Route], settings: Settings) -> dict[str, Any]:
    documented = [route for route in routes if route.documented]
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for route in documented:
        paths[route.path][route.method.lower()] = _operation(route)
    schemas: dict[str, Any] = {}
    for model in _models(documented):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    _gateway_rules(schemas, settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Polos Orchestrator API (submission gateway)",
            "version": "1.0.0",
            "description": "Submit durable workflow executions and follow them; RabbitMQ-backed.",
        },
        "paths": dict(paths),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer_auth": {"type": "http", "scheme": "bearer"},
                "cookie_auth": {"type": "apiKey", "in": "cookie", "name": "polos_auth"},
            },
        },
    }


def openapi_json(routes: Sequence[Route], settings: Settings) -> bytes:
    return orjson.dumps(build_openapi(routes, settings))
