"""``/openapi.json`` is generated from the route table the app is built from: every
route described, every error an operation answers listed, the event stream per event."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.app import create_app
from gateway.context import APP_OPENAPI
from gateway.settings import Settings
from tests.conftest import openapi_refs, resolve_ref

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "tests" / "spec" / "submit-workflow.openapi.yaml"

OPERATIONS = [
    ("/api/v1/workflows/batch_run", "post", "batch_run_workflows", {"200", "400", "404", "503"}),
    ("/api/v1/workflows/{workflow_id}/runs", "get", "list_workflow_runs", {"200", "400", "503"}),
    ("/api/v1/executions/{execution_id}", "get", "get_execution", {"200", "400", "404", "503"}),
    (
        "/api/v1/executions/{execution_id}/cancel",
        "post",
        "cancel_execution",
        {"200", "202", "400", "404", "409", "503"},
    ),
    ("/api/v1/executions/{execution_id}/events", "get", "execution_events", {"200", "404"}),
]


def _document() -> dict[str, Any]:
    """What ``GET /openapi.json`` answers."""
    document: dict[str, Any] = orjson.loads(create_app(Settings())[APP_OPENAPI])
    return document


def _operations() -> list[tuple[str, str]]:
    return [(path, method) for path, ops in _document()["paths"].items() for method in ops]


def test_every_reference_resolves() -> None:
    document = _document()
    for ref in openapi_refs(document):
        assert resolve_ref(document, ref) is not None, ref


def test_the_description_has_exactly_the_routes_the_app_serves() -> None:
    app = create_app(Settings())
    # The operator page (/ui) is a surface of its own behind an admin key, not the API.
    served = {
        (resource.canonical, route.method.lower())
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD" and not resource.canonical.startswith("/ui")
    }

    described = {
        (path, method) for path, operations in _document()["paths"].items() for method in operations
    }

    assert described == served


@pytest.mark.parametrize(("path", "method", "operation_id", "statuses"), OPERATIONS)
def test_operation_is_described(
    path: str, method: str, operation_id: str, statuses: set[str]
) -> None:
    operation = _document()["paths"][path][method]
    assert operation["operationId"] == operation_id
    assert statuses | {"401", "403"} <= set(operation["responses"])
    assert "X-Project-ID" in {p["name"] for p in operation["parameters"]}
    assert operation["security"]


@pytest.mark.parametrize(("path", "method"), _operations())
def test_every_error_an_operation_can_answer_is_listed_with_its_headers(
    path: str, method: str
) -> None:
    operation = _document()["paths"][path][method]
    responses = operation["responses"]

    # What any route meets (malformed HTTP, limits, a bug), and with a key an unknown project.
    expected = {"400", "408", "414", "431", "500", "503"}
    if operation.get("security"):
        expected |= {"401", "403", "404"}
        assert "WWW-Authenticate" in responses["401"]["headers"]
    assert expected <= set(responses), sorted(responses)
    for status, response in responses.items():
        assert response["description"], status
        if int(status) >= 400:
            assert "application/json" in response["content"], status
            if int(status) in (429, 503):
                assert "Retry-After" in response["headers"], status


def test_the_event_stream_is_described_per_event_with_its_data_schemas() -> None:
    document = _document()
    operation = document["paths"]["/api/v1/executions/{execution_id}/events"]["get"]
    stream = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]

    events = {}
    for variant in stream["oneOf"]:
        assert set(variant["required"]) == {"event", "data"}
        data = variant["properties"]["data"]
        assert data["contentMediaType"] == "application/json"
        events[variant["properties"]["event"]["const"]] = data["contentSchema"]["$ref"]
    assert events == {
        "record": "#/components/schemas/ExecutionRecord",
        "lifecycle": "#/components/schemas/LifecycleEvent",
    }
    for ref in events.values():
        assert resolve_ref(document, ref)["properties"]


def test_submit_workflow_is_the_polos_operation() -> None:
    polos = yaml.safe_load(SPEC.read_text())
    path = "/api/v1/workflows/{workflow_id}/run"
    theirs = polos["paths"][path]["post"]
    ours = _document()["paths"][path]["post"]

    for key in ("operationId", "tags", "summary", "security"):
        assert ours[key] == theirs[key], key
    # Polos's parameters, plus our one extension (an optional header Polos clients omit).
    extension = [p for p in ours["parameters"] if p["name"] == "Idempotency-Key"]
    assert [p for p in ours["parameters"] if p not in extension] == theirs["parameters"]
    assert [p["required"] for p in extension] == [False]
    assert ours["requestBody"]["required"] is True
    assert openapi_refs(ours["requestBody"]) == openapi_refs(theirs["requestBody"])
    assert openapi_refs(ours["responses"]["200"]) == openapi_refs(theirs["responses"]["200"])
    assert set(theirs["responses"]) <= set(ours["responses"])
    schemas = _document()["components"]["schemas"]
    for name in ("SubmitWorkflowRequest", "SubmitWorkflowResponse"):
        spec_schema = polos["components"]["schemas"][name]
        assert set(schemas[name]["properties"]) == set(spec_schema["properties"]), name
        assert set(schemas[name].get("required", [])) == set(spec_schema["required"]), name


def test_the_batch_and_record_shapes_are_the_polos_ones() -> None:
    schemas = _document()["components"]["schemas"]
    item = schemas["BatchWorkflowItem"]
    assert {"workflow_id", "payload"} <= set(item["required"])
    assert set(schemas["BatchRunResponse"]["properties"]) == {"executions"}
    record = schemas["ExecutionRecord"]["properties"]
    for field in ("id", "workflow_id", "status", "payload", "result", "error", "cancelled_by"):
        assert field in record, field
    cancel = schemas["CancelExecutionResponse"]["properties"]
    assert set(cancel) == {"execution_id", "status", "cancelled_at"}


def test_every_error_kind_of_the_catalogue_is_answered_by_some_route() -> None:
    from gateway import errors
    from gateway.routes import ROUTES

    answered = {kind for route in ROUTES for kind in route.error_kinds()}
    # Routing errors belong to no operation: they answer paths and methods there are none of.
    unrouted = {errors.ROUTE_NOT_FOUND, errors.METHOD_NOT_ALLOWED}
    # The operator page's own (/ui, outside the API description).
    unrouted.add(errors.ADMIN_KEY_REQUIRED)

    assert set(errors.CATALOGUE) - unrouted == answered


def test_errors_are_made_only_from_the_catalogue() -> None:
    gateway = REPO / "gateway"
    for module in sorted(gateway.glob("*.py")):
        if module.name == "errors.py":
            continue
        found = re.findall(r"\b(?:ApiError|ErrorKind)\(", module.read_text())
        assert not found, f"{module.name} makes an error outside gateway/errors.py"


def test_the_description_states_the_configured_limits_and_the_id_format() -> None:
    settings = Settings(
        max_run_timeout_seconds=600, default_run_timeout_seconds=60, max_batch_items=7
    )
    document: dict[str, Any] = orjson.loads(create_app(settings)[APP_OPENAPI])
    schemas = document["components"]["schemas"]

    for model in ("SubmitWorkflowRequest", "BatchWorkflowItem"):
        timeout = schemas[model]["properties"]["run_timeout_seconds"]["anyOf"][0]
        assert timeout["maximum"] == 600, model
    assert schemas["BatchRunRequest"]["properties"]["workflows"]["maxItems"] == 7
    execution = document["paths"]["/api/v1/executions/{execution_id}"]["get"]["parameters"][0]
    assert re.fullmatch(execution["schema"]["pattern"], "0190b6c5-2b1a-7c3d-8e4f-0123456789ab")
    assert not re.fullmatch(execution["schema"]["pattern"], "0190b6c5-2b1a-7c3d-8e4f")
