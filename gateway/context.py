"""Typed application keys: what the app holds for its handlers."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from gateway.auth import KeyStore
from gateway.bodies import BodyReads
from gateway.link import BrokerLink
from gateway.settings import Settings
from gateway.watch import Watch
from store import ExecutionStore
from store.idempotency import IdempotencyKeys

APP_SETTINGS = web.AppKey("settings", Settings)
APP_KEYS = web.AppKey("keys", KeyStore)
APP_LINK = web.AppKey("link", BrokerLink)
APP_OPENAPI = web.AppKey("openapi", bytes)
APP_BODY_READS = web.AppKey("body_reads", BodyReads)
APP_REDIS = web.AppKey("redis", aioredis.Redis)
APP_STORE = web.AppKey("store", ExecutionStore)
APP_WATCH = web.AppKey("watch", Watch)
APP_IDEMPOTENCY = web.AppKey("idempotency", IdempotencyKeys)
