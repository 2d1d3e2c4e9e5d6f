"""Spans: with the otel extra and OTEL_EXPORTER_OTLP_ENDPOINT, submit, admission,
dispatch and the handler's run reach an OTLP/HTTP collector in the caller's trace;
without the endpoint, OpenTelemetry is not even imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import REPO_ROOT
from tests.execution_support import System, running_system

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Collector:
    """An OTLP/HTTP trace receiver in a thread of its own (the exporters post from
    threads; the test's loop serves the system)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    )
                    for scope in resource.scope_spans:
                        collector.spans.extend((service, span) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def named(self, name: str) -> list[tuple[str, Any]]:
        return [(service, span) for service, span in self.spans if span.name == name]


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    collector.thread.start()
    yield collector
    collector.server.shutdown()
    collector.server.server_close()


@pytest.fixture
async def traced_system(
    amqp_url: str, tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[System]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export soon
    async with running_system(amqp_url, tmp_path) as system:
        yield system


async def test_spans_of_one_submission_share_the_callers_trace(
    traced_system: System, collector: Collector
) -> None:
    system = traced_system
    response = await system.client.post(
        "/api/v1/workflows/echo/run",
        json={"payload": 1},
        headers={**system.headers, "traceparent": TRACEPARENT},
    )
    assert response.status == 200
    execution_id = (await response.json())["execution_id"]
    await system.wait_status(execution_id, "completed")

    names = ("submit", "admission", "dispatch", "run echo")
    for _ in range(150):
        if all(collector.named(name) for name in names):
            break
        await asyncio.sleep(0.1)
    spans = {name: collector.named(name)[0] for name in names}
    assert {name: service for name, (service, _) in spans.items()} == {
        "submit": "polos-gateway",
        "admission": "polos-dispatcher",
        "dispatch": "polos-dispatcher",
        "run echo": "polos-worker",
    }
    for _, span in spans.values():
        assert span.trace_id.hex() == TRACE_ID
    submit = spans["submit"][1]
    assert submit.parent_span_id.hex() == "00f067aa0ba902b7", "child of the caller's span"
    for name in ("admission", "dispatch", "run echo"):
        assert spans[name][1].parent_span_id == submit.span_id, name
    run = spans["run echo"][1]
    attributes = {a.key: a.value.string_value for a in run.attributes}
    assert attributes["polos.execution_id"] == execution_id
    assert attributes["polos.outcome"] == "completed"
    # The handler saw the submit span as its parent (what the envelope carries).
    record = await system.get(execution_id)
    assert record["status"] == "completed"


def test_without_an_endpoint_no_tracing_module_is_loaded() -> None:
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.settings import Settings\n"
        "from dispatcher import Dispatcher, Settings as DS\n"
        "from worker import Worker\n"
        "create_app(Settings())\n"
        "Worker(project='p', deployment='d')\n"
        "import asyncio\n"
        "async def main():\n"
        "    Dispatcher(DS())\n"
        "asyncio.run(main())\n"
        # redis-py loads OpenTelemetry's metrics API for itself; tracing is ours.
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "loaded = [m for m in sys.modules if m.startswith(ours)]\n"
        "assert not loaded, loaded\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
