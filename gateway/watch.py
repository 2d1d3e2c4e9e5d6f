"""Live lifecycle events for the event streams (``GET /api/v1/executions/{id}/events``).

    recorder ──EVALSHA (write the event, then PUBLISH it)──► Redis
        <prefix>events:{<project>}:<execution_id> ──one connection per gateway process──►
            Watch ──► the streams of that execution

The recorder publishes each event on its execution's pub/sub channel
(``store.layout.events_channel``) in the same script call that writes it to
the record, so the record and the stream cannot disagree: an event a stream
missed before it subscribed is in the record it reads next. A stream
subscribes first and reads the record second; ``subscribe()`` returns only
once Redis confirmed the subscription.

A process has one pub/sub connection however many streams it serves; a
channel is subscribed while at least one stream watches its execution (the
first stream subscribes, the last one to go unsubscribes), and events fan out
in process. The channel names the project, so a stream only ever hears its
own project's events.

If the connection is lost (or goes silent: a ``PING`` unanswered), the
process subscribes every watched channel again on a new one, backing off
while Redis is away, and then tells every stream to read its record again
(``RESYNC``): events published meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from pydantic import ValidationError
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from schemas.dispatch import LifecycleEvent, decode_lifecycle
from store import StoreUnavailable
from store.layout import events_channel

log = logging.getLogger(__name__)

# Silence on the connection for this long sends a PING; three times as long, it is lost.
KEEPALIVE_SECONDS = 5.0
_LOST = (redis_errors.RedisError, OSError, RuntimeError)


class Signal:
    """Not an event: the stream must read the record again, or end."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


RESYNC = Signal("resync")
END = Signal("end")

Item = tuple[LifecycleEvent, bytes] | Signal


@dataclass(eq=False)
class Subscription:
    project_id: str
    execution_id: str
    key_id: str  # whose stream: revoking the key ends it
    inbox: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class _Watched:
    ready: asyncio.Future[None]  # Redis confirmed the subscription
    subscriptions: set[Subscription] = field(default_factory=set)
    subscribed: bool = False  # SUBSCRIBE sent on the current connection


class Watch:
    def __init__(
        self,
        redis_url: str,
        *,
        key_prefix: str,
        timeout_seconds: float = 2.0,
        wait_seconds: float | None = None,
        reconnect_max_seconds: float = 2.0,
    ) -> None:
        # A client of its own: retries off (a lost connection is handled here, where the
        # streams can be told) and no health checks (their PING would race our reader).
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._prefix = key_prefix
        # How long a stream may wait for its subscription: the same bound as a read's
        # wait for a pooled connection (many streams at once queue behind one another).
        self._timeout = wait_seconds if wait_seconds is not None else timeout_seconds
        self._reconnect_max = reconnect_max_seconds
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._commands = asyncio.Lock()  # SUBSCRIBE/UNSUBSCRIBE go out in decision order
        self._watched: dict[str, _Watched] = {}
        self._confirms: dict[str, deque[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    @property
    def channels(self) -> int:
        """Channels subscribed now (one per watched execution)."""
        return sum(1 for watched in self._watched.values() if watched.subscribed)

    @property
    def streams(self) -> int:
        return sum(len(watched.subscriptions) for watched in self._watched.values())

    async def subscribe(self, project_id: str, execution_id: str, key_id: str) -> Subscription:
        """Events of ``execution_id`` from now on; raises ``StoreUnavailable``."""
        channel = events_channel(self._prefix, project_id, execution_id)
        subscription = Subscription(project_id, execution_id, key_id)
        watched = self._watched.get(channel)
        if watched is None:
            watched = self._watched[channel] = _Watched(_new_ready())
        watched.subscriptions.add(subscription)
        try:
            async with asyncio.timeout(self._timeout):
                if not watched.subscribed:
                    async with self._commands:
                        await self._send_subscribe(channel, watched)
                await asyncio.shield(watched.ready)
        except BaseException as exc:
            self.unsubscribe(subscription)
            if isinstance(exc, Exception):
                raise StoreUnavailable(f"cannot watch {execution_id}: {exc!r}") from exc
            raise
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """The stream is gone; the last one of an execution unsubscribes its channel."""
        channel = events_channel(self._prefix, subscription.project_id, subscription.execution_id)
        watched = self._watched.get(channel)
        if watched is None or subscription not in watched.subscriptions:
            return
        watched.subscriptions.discard(subscription)
        if not watched.subscriptions:
            del self._watched[channel]
            if watched.subscribed:
                self._spawn(self._unsubscribe(channel))

    def end_all(self) -> None:
        """Shutdown: every stream ends now (its client reconnects to another gateway)."""
        self.end_if(lambda _project_id, _key_id: True)

    def end_if(self, ended: Callable[[str, str], bool]) -> int:
        """End the streams for which ``ended(project_id, key_id)``; how many."""
        count = 0
        for watched in self._watched.values():
            for subscription in watched.subscriptions:
                if ended(subscription.project_id, subscription.key_id):
                    subscription.inbox.put_nowait(END)
                    count += 1
        return count

    async def close(self) -> None:
        for task in [*self._tasks, *([self._listener] if self._listener else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self._drop_connection()
        await self._redis.aclose()

    # -- commands (under ``_commands``) -------------------------------------------------

    async def _send_subscribe(self, channel: str, watched: _Watched) -> None:
        if watched.subscribed or self._watched.get(channel) is not watched:
            return
        pubsub = await self._connected()
        # Each SUBSCRIBE gets one confirmation, in order: one future per command sent.
        self._confirms.setdefault(channel, deque()).append(watched.ready)
        try:
            await pubsub.subscribe(channel)
        except BaseException:
            self._confirms[channel].pop()
            raise
        watched.subscribed = True

    async def _unsubscribe(self, channel: str) -> None:
        async with self._commands:
            if channel in self._watched or self._pubsub is None:
                return  # watched again meanwhile: it stays subscribed
            try:
                await self._pubsub.unsubscribe(channel)
            except _LOST as exc:
                log.debug("unsubscribing %s failed: %r", channel, exc)

    async def _connected(self) -> PubSub:
        if self._pubsub is None:
            pubsub = self._redis.pubsub()
            await pubsub.connect()  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="watch-listener"
            )
        return self._pubsub

    # -- the listener -------------------------------------------------------------------

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        while True:
            pubsub = self._pubsub
            try:
                if pubsub is None:
                    raise redis_errors.ConnectionError("no connection")
                message = await pubsub.get_message(timeout=1.0)
                now = loop.time()
                if message is not None:
                    heard = now
                    self._on_message(message)
                elif not pubsub.subscribed:
                    heard = now  # nothing watched: nothing to miss
                elif now - heard > 3 * KEEPALIVE_SECONDS:
                    raise redis_errors.TimeoutError("no answer to PING")
                elif now - max(heard, pinged) > KEEPALIVE_SECONDS:
                    pinged = now
                    await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # _LOST, or a bug: either way, start afresh
                if not isinstance(exc, _LOST):
                    log.exception("live events: the listener failed")
                await self._recover(exc)
                heard = pinged = loop.time()

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel"))
        if kind == "subscribe":
            waiting = self._confirms.get(channel)
            if waiting:
                ready = waiting.popleft()
                if not ready.done():
                    ready.set_result(None)
                if not waiting:
                    del self._confirms[channel]
            return
        if kind != "message":
            return
        watched = self._watched.get(channel)
        if watched is None:
            return
        raw = message["data"]
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
        try:
            event = decode_lifecycle(raw)
        except (ValidationError, ValueError) as exc:
            log.warning("ignoring an undecodable lifecycle event: %s", exc)
            return
        for subscription in watched.subscriptions:
            if subscription.project_id == event.project_id:
                subscription.inbox.put_nowait((event, raw))

    async def _recover(self, cause: BaseException) -> None:
        """Subscribe every watched channel on a new connection, then resync every stream."""
        log.warning("live events: Redis connection lost (%r); subscribing again", cause)
        self.reconnects += 1
        delay = 0.05
        while True:
            async with self._commands:
                await self._drop_connection()
                try:
                    await self._resubscribe_all()
                except _LOST as exc:
                    log.debug("live events: Redis still away: %r", exc)
                else:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max)
        for watched in self._watched.values():
            for subscription in watched.subscriptions:
                subscription.inbox.put_nowait(RESYNC)

    async def _resubscribe_all(self) -> None:
        pubsub = self._redis.pubsub()
        await pubsub.connect()  # type: ignore[no-untyped-call]
        self._pubsub = pubsub
        names = list(self._watched)
        if names:
            for name in names:
                watched = self._watched[name]
                if watched.ready.done():
                    watched.ready = _new_ready()
                self._confirms.setdefault(name, deque()).append(watched.ready)
            await pubsub.subscribe(*names)
            for name in names:
                self._watched[name].subscribed = True

    async def _drop_connection(self) -> None:
        """Forget the connection; whoever waited for a confirmation on it fails."""
        pubsub, self._pubsub = self._pubsub, None
        for waiting in self._confirms.values():
            for ready in waiting:
                if not ready.done():
                    ready.set_exception(redis_errors.ConnectionError("connection lost"))
        self._confirms.clear()
        for watched in self._watched.values():
            watched.subscribed = False
            if watched.ready.done() and watched.ready.exception() is not None:
                watched.ready = _new_ready()
        if pubsub is not None:
            with contextlib.suppress(*_LOST):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _new_ready() -> asyncio.Future[None]:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Failed when a connection is lost, maybe with no stream left waiting for it.
    ready.add_done_callback(_retrieve)
    return ready


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
