"""The example fleet that ``make up`` starts: the workflow ``hello``.

    POLOS_DEV_PROJECT=demo POLOS_DEV_DEPLOYMENT=dev-1 python -m worker examples.hello_worker:worker

Project and deployment come from ``POLOS_DEV_PROJECT`` (default ``demo``) and
``POLOS_DEV_DEPLOYMENT`` (default ``dev-1``); the broker from ``POLOS_AMQP_URL``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from worker import ExecutionContext, Worker

worker = Worker(
    project=os.environ.get("POLOS_DEV_PROJECT", "demo"),
    deployment=os.environ.get("POLOS_DEV_DEPLOYMENT", "dev-1"),
)


@worker.workflow("hello")
async def hello(ctx: ExecutionContext, payload: Any) -> dict[str, str]:
    name = payload.get("name") if isinstance(payload, dict) else None
    return {"greeting": f"Hello, {name or 'world'}!", "execution_id": ctx.execution_id}


if __name__ == "__main__":
    asyncio.run(worker.run())
