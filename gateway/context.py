"""Typed application keys: what the app holds for its handlers."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import KeyStore
from gateway.bodies import BodyReads
from gateway.link import BrokerLink
from gateway.settings import Settings

APP_SETTINGS = web.AppKey("settings", Settings)
APP_KEYS = web.AppKey("keys", KeyStore)
APP_LINK = web.AppKey("link", BrokerLink)
APP_OPENAPI = web.AppKey("openapi", bytes)
APP_BODY_READS = web.AppKey("body_reads", BodyReads)
