"""The peer: what users build instead of the gateway, FastAPI + pydantic + Celery.

    BENCH_PEER_AMQP_URL=... BENCH_PEER_QUEUE=... uvicorn bench.peer:app        (one process)
    BENCH_PEER_AMQP_URL=... BENCH_PEER_QUEUE=... BENCH_RECORDS=dir \\
        celery -A bench.peer:celery worker -Q <queue> ...

The endpoint is written as the FastAPI and Celery documentation suggest: a
plain ``def`` (FastAPI runs it in its thread pool, since ``send_task``
blocks), the same pydantic request model as the gateway
(``schemas.api.SubmitWorkflowRequest``: the same validation of the same
body), and ``send_task`` to a durable quorum queue with publisher confirms
(``broker_transport_options={"confirm_publish": True}``: the 200 comes after
the broker's ack, as with the gateway). No authentication: the peer does less
than the gateway per request. Tried and not kept (``python -m bench peer``, 4 s
each): an ``async def`` endpoint calling ``send_task`` (it blocks the event
loop: 751/s, p99 735 ms), a producer pool of 64 instead of Celery's 10
(842/s, within noise of the default's 800-980/s).

The worker side runs the same no-op task as our worker (``acks_late``: the
message is acknowledged after the task, as ours is), noting when each task
started (``bench.records``) in a file per worker process.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from fastapi import FastAPI
from kombu.entity import Exchange, Queue

from bench.records import RECORDS_ENV, RecordWriter
from schemas.api import SubmitWorkflowRequest, SubmitWorkflowResponse

QUEUE = os.environ.get("BENCH_PEER_QUEUE", "bench.peer")
TASK = "bench.noop"
_URL = os.environ.get("BENCH_PEER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

celery = Celery("bench_peer", broker=_URL)
celery.conf.update(
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    task_queues=[
        Queue(  # type: ignore[no-untyped-call]
            QUEUE,
            Exchange(QUEUE, type="direct", durable=True),  # type: ignore[no-untyped-call]
            routing_key=QUEUE,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        )
    ],
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)

app = FastAPI(title="bench peer")


@app.post("/api/v1/workflows/{workflow_id}/run")
def submit(workflow_id: str, body: SubmitWorkflowRequest) -> SubmitWorkflowResponse:
    execution_id = str(uuid.uuid4())
    celery.send_task(TASK, args=(workflow_id, body.payload), task_id=execution_id, queue=QUEUE)
    created_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    return SubmitWorkflowResponse(execution_id=execution_id, created_at=created_at)


@app.get("/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}


_records: RecordWriter | None = None


@celery.task(name=TASK, acks_late=True)  # type: ignore[untyped-decorator]
def noop(workflow_id: str, payload: Any) -> None:
    global _records
    if _records is None:
        _records = RecordWriter(str(Path(os.environ[RECORDS_ENV]) / f"celery-{os.getpid()}.txt"))
    _records.started(payload, noop.request.id)
