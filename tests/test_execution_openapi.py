"""The API description names every operation of the execution API, with its answers."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.openapi import build_openapi

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


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves() -> None:
    document = build_openapi()
    for ref in _refs(document):
        assert _resolve(document, ref) is not None, ref


@pytest.mark.parametrize(("path", "method", "operation_id", "statuses"), OPERATIONS)
def test_operation_is_described(
    path: str, method: str, operation_id: str, statuses: set[str]
) -> None:
    operation = build_openapi()["paths"][path][method]
    assert operation["operationId"] == operation_id
    assert statuses | {"401", "403"} <= set(operation["responses"])
    assert "X-Project-ID" in {p["name"] for p in operation["parameters"]}
    assert operation["security"]


def test_the_batch_and_record_shapes_are_the_polos_ones() -> None:
    document = build_openapi()
    schemas = document["components"]["schemas"]
    item = schemas["BatchWorkflowItem"]
    assert {"workflow_id", "payload"} <= set(item["required"])
    assert set(schemas["BatchRunResponse"]["properties"]) == {"executions"}
    record = schemas["ExecutionRecord"]["properties"]
    for field in ("id", "workflow_id", "status", "payload", "result", "error", "cancelled_by"):
        assert field in record, field
    cancel = schemas["CancelExecutionResponse"]["properties"]
    assert set(cancel) == {"execution_id", "status", "cancelled_at"}
