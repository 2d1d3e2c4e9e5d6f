"""Serving a process's metrics: ``GET /metrics`` on ``POLOS_METRICS_PORT``.

The listener is an aiohttp site in the process's own event loop, not
prometheus-client's thread server: collectors that read live state at scrape
time (queue owners, running executions) then run between two steps of the
loop, never beside them, and need no locks. Values a scrape must ask the
broker for are refreshed by ``refresh`` hooks awaited first, each within a
short timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

Refresh = Callable[[], Awaitable[None]]
REFRESH_TIMEOUT_SECONDS = 2.0

# Seconds; from a loopback publish confirm (~1 ms) to a confirm timeout (5 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Handler runs and admission waits: from milliseconds to an hour.
DURATION_BUCKETS = (0.005, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        refresh: Sequence[Refresh] = (),
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._refresh = list(refresh)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.refresh()
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def refresh(self) -> None:
        for hook in self._refresh:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                    await hook()
            except Exception as exc:
                # A scrape still answers, with the values last read.
                log.debug("metrics refresh failed: %r", exc)
