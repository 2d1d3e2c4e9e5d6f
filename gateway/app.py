"""``create_app(settings)``: the gateway's aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import handlers
from gateway.auth import KeyStore
from gateway.bodies import BodyReads
from gateway.context import APP_BODY_READS, APP_KEYS, APP_LINK, APP_OPENAPI, APP_SETTINGS
from gateway.errors import error_middleware
from gateway.link import BrokerLink
from gateway.openapi import openapi_json
from gateway.settings import Settings

log = logging.getLogger(__name__)


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    keys = app[APP_KEYS]
    keys.load()

    def reload() -> None:
        try:
            keys.load()
            log.info("reloaded %s", keys.path)
        except Exception:
            log.exception("reloading %s failed; keeping the keys loaded before", keys.path)

    loop = asyncio.get_running_loop()
    # Only the main thread can own signal handlers (tests run apps elsewhere).
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, reload)
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.remove_signal_handler(signal.SIGHUP)


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    # Cleanup contexts run after in-flight handlers finished on shutdown, so
    # their confirms arrive before the connection closes.
    link = app[APP_LINK]
    await link.start()
    yield
    await link.close()


async def _abandon_incomplete_bodies(app: web.Application) -> None:
    # on_shutdown runs once aiohttp has stopped reading the connections.
    abandoned = app[APP_BODY_READS].abandon_incomplete()
    if abandoned:
        log.info("shutting down: closed %d connections whose body was still arriving", abandoned)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[APP_SETTINGS] = settings
    app[APP_KEYS] = KeyStore(settings.projects_file)
    app[APP_LINK] = BrokerLink(settings)
    app[APP_OPENAPI] = openapi_json()
    app[APP_BODY_READS] = BodyReads()
    app.on_shutdown.append(_abandon_incomplete_bodies)
    app.cleanup_ctx.append(_keys_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.router.add_post("/api/v1/workflows/{workflow_id}/run", handlers.submit_workflow)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/openapi.json", handlers.openapi)
    return app
