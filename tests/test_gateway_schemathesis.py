"""schemathesis against the gateway, through /openapi.json: every answer is one the
description lists, in the shape it gives; nothing the description refuses is accepted;
no 500. Bounded (examples per operation, a fixed seed) to stay within seconds.

The project has no deployment, so every submission stops at its 404 before any
queue is declared: generated queue names never reach the broker. One completed
execution is recorded, so a record and an event stream are checked too.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson

from gateway.app import create_app
from gateway.context import APP_LINK, APP_OPENAPI
from gateway.server import serving
from gateway.settings import Settings
from store import ExecutionStore
from tests.conftest import Tenant
from tests.store_support import Run

CONFIG = Path(__file__).parent / "schemathesis.toml"
MAX_EXAMPLES = 15


async def test_the_api_answers_as_its_description_says(
    amqp_url: str, tenant: Tenant, uid: str, store: ExecutionStore, tmp_path: Path
) -> None:
    run = Run(tenant.project_id)
    await store.record(run.lifecycle())
    settings = Settings(
        amqp_url=amqp_url,
        projects_file=tenant.projects_file,
        redis_key_prefix=f"test:{uid}:",
        header_timeout_seconds=5.0,
    )
    app = create_app(settings)
    async with serving(app, settings, host="127.0.0.1", port=0) as site:
        async with asyncio.timeout(15):
            await app[APP_LINK].wait_ready()
        auth = dict(tenant.headers)
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--no-color",
            "--config-file",
            str(CONFIG),
            "run",
            f"http://127.0.0.1:{site.port}/openapi.json",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "1",
            "--request-timeout",
            "10",
            *(option for name, value in auth.items() for option in ("-H", f"{name}: {value}")),
        ]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "POLOS_TEST_EXECUTION_ID": run.execution_id},
            cwd=tmp_path,  # its cache of failures (.schemathesis/) goes with the test
        )
        output, _ = await process.communicate()

    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
    # Every operation but /openapi.json itself (schemathesis leaves out what it reads).
    operations = sum(len(methods) for methods in orjson.loads(app[APP_OPENAPI])["paths"].values())
    assert f"Tested: {operations - 1}" in report, report[-2000:]
