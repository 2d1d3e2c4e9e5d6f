"""``create_app(settings)``: the gateway's aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import observe, operator
from gateway.auth import KeyStore, Principal
from gateway.bodies import BodyReads
from gateway.context import (
    APP_BODY_READS,
    APP_IDEMPOTENCY,
    APP_KEYS,
    APP_LINK,
    APP_OPENAPI,
    APP_REDIS,
    APP_SETTINGS,
    APP_STORE,
    APP_WATCH,
)
from gateway.errors import error_middleware
from gateway.link import BrokerLink
from gateway.openapi import openapi_json
from gateway.routes import ROUTES, add_routes
from gateway.server import handler_args, head_check
from gateway.settings import Settings
from gateway.watch import Watch
from store import ExecutionStore, open_redis
from store.idempotency import IdempotencyKeys

log = logging.getLogger(__name__)


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    keys = app[APP_KEYS]
    keys.load()

    def reload() -> None:
        try:
            keys.load()
        except Exception:
            log.exception("reloading %s failed; keeping the keys loaded before", keys.path)
            return
        # A revoked key's open event streams end with it.
        ended = app[APP_WATCH].end_if(
            lambda project_id, key_id: not keys.holds(Principal(project_id, key_id))
        )
        log.info("reloaded %s; ended %d event streams of revoked keys", keys.path, ended)

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


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    # The client connects on first use: Redis down delays nothing here, and only
    # the status endpoints answer 503 while it is.
    yield
    await app[APP_WATCH].close()
    await app[APP_REDIS].aclose()


async def _abandon_incomplete_bodies(app: web.Application) -> None:
    # on_shutdown runs once aiohttp has stopped reading the connections.
    abandoned = app[APP_BODY_READS].abandon_incomplete()
    if abandoned:
        log.info("shutting down: closed %d connections whose body was still arriving", abandoned)


async def _end_event_streams(app: web.Application) -> None:
    # Streams never end by themselves; shutdown would wait for them until its timeout.
    app[APP_WATCH].end_all()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware(settings.retry_after_seconds, head_check(settings))],
        handler_args=handler_args(settings),
    )
    app[APP_SETTINGS] = settings
    app[APP_KEYS] = KeyStore(settings.projects_file)
    app[APP_LINK] = BrokerLink(settings)
    app[APP_OPENAPI] = openapi_json(ROUTES, settings)
    app[APP_BODY_READS] = BodyReads()
    redis_client = open_redis(
        settings.redis_url.get_secret_value(),
        timeout_seconds=settings.redis_timeout_seconds,
        max_connections=settings.redis_max_connections,
        pool_timeout_seconds=settings.redis_pool_timeout_seconds,
    )
    app[APP_REDIS] = redis_client
    app[APP_STORE] = ExecutionStore(redis_client, key_prefix=settings.redis_key_prefix)
    app[APP_WATCH] = Watch(
        settings.redis_url.get_secret_value(),
        key_prefix=settings.redis_key_prefix,
        timeout_seconds=settings.redis_timeout_seconds,
        wait_seconds=max(settings.redis_timeout_seconds, settings.redis_pool_timeout_seconds),
    )
    app[APP_IDEMPOTENCY] = IdempotencyKeys(
        redis_client,
        retention_seconds=settings.idempotency_retention_seconds,
        lease_seconds=settings.idempotency_lease,
        key_prefix=settings.redis_key_prefix,
    )
    app.on_shutdown.append(_abandon_incomplete_bodies)
    app.on_shutdown.append(_end_event_streams)
    app.cleanup_ctx.append(_keys_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_store_ctx)
    add_routes(app)
    observe.install(app, settings)  # metrics and spans, when configured
    operator.install(app, settings)  # the operator page, /ui
    return app
