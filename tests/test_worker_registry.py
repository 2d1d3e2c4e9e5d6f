"""A starting worker registers its deployment: the gateway then accepts its workflows."""

from __future__ import annotations

from collections.abc import Callable

from schemas.topology import submit_queue
from tests.conftest import GatewayFactory, Tenant
from tests.workflows import add_workflows
from worker import Worker


async def test_started_worker_makes_its_workflows_submittable(
    make_gateway: GatewayFactory,
    tenant: Tenant,
    amqp_url: str,
    delete_queues: Callable[[str], None],
) -> None:
    worker = add_workflows(Worker(project=tenant.project_id, deployment="v7", amqp_url=amqp_url))
    delete_queues(worker.work_queue)
    delete_queues(submit_queue(tenant.project_id, "echo"))
    await worker.start()
    try:
        client = await make_gateway()

        by_default = await client.post(
            "/api/v1/workflows/echo/run", json={"payload": 1}, headers=tenant.headers
        )
        by_name = await client.post(
            "/api/v1/workflows/echo/run",
            json={"payload": 2, "deployment_id": "v7"},
            headers=tenant.headers,
        )
        unknown = await client.post(
            "/api/v1/workflows/not-registered/run", json={"payload": 3}, headers=tenant.headers
        )
    finally:
        await worker.stop()

    assert by_default.status == 200, await by_default.text()
    assert by_name.status == 200, await by_name.text()
    assert unknown.status == 404
