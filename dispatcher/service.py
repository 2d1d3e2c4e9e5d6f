"""The dispatcher: a supervisor that keeps one session alive, and its in-process API.

    d = Dispatcher(settings)
    await d.start()          connect (retrying with backoff, node after node), own the
                             matching queues;
                             returns once ``d.ready`` is set
    d.ready                  set while a session is up (registry replayed, queues consumed)
    d.idle                   set while nothing is pending or held in any queue
    await d.stop()           graceful: admit nothing more, let in-flight executions end
                             (POLOS_DISPATCHER_DRAIN_TIMEOUT_SECONDS), close; the broker requeues
                             the rest for the next owner
    await d.run(burst=True)  until stop() (SIGTERM) or, in burst mode, until every
                             owned queue is empty and nothing is held

A lost connection or channel ends the session; the next one is built from
scratch, on the next node of the cluster first, after a short jittered backoff
(``broker.connection.Backoff``, at most POLOS_RECONNECT_INTERVAL_SECONDS); the
broker has requeued what the old one held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from broker.connection import SETTLE_SECONDS
from dispatcher.observe import DispatcherObserver
from dispatcher.session import Session
from dispatcher.settings import Settings
from dispatcher.status import Watchers

log = logging.getLogger(__name__)

BURST_QUIET_SECONDS = 0.5


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nodes = settings.broker_nodes()
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.sessions = 0  # sessions started so far (a restart shows here)
        self._busy = 0
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._drain_on_stop = True
        self._session: Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_activity = 0.0
        # Queues the last session owned: the next one looks for them first.
        self._owned: set[tuple[str, str]] = set()
        # Metrics, spans and the operator page's status (dispatcher/observe.py, status.py).
        self.observer = DispatcherObserver(settings.observe)
        self._watchers = Watchers(self, self.observer)

    @property
    def session(self) -> Session | None:
        return self._session

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the supervisor and wait until a session is up."""
        self._spawn_supervisor()
        assert self._task is not None
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._task.done():
            self._task.result()
            raise RuntimeError("the dispatcher stopped before it was ready")

    def request_stop(self, *, drain: bool = True) -> None:
        """Stop (what SIGTERM does); asked again while draining, stop draining."""
        if self._stop.is_set():
            self._hurry.set()
        self._drain_on_stop = drain
        self._stop.set()

    async def stop(self, *, drain: bool = True) -> None:
        self.request_stop(drain=drain)
        if self._task is not None:
            await self._task

    async def run(self, *, burst: bool = False) -> None:
        self._spawn_supervisor()
        try:
            if burst:
                await self._until_burst_done()
            else:
                await self._stop.wait()
        finally:
            # A SIGTERM has already asked for the stop: asking again here would
            # count as a second signal and cut the drain short.
            if not self._stop.is_set():
                self.request_stop(drain=self._drain_on_stop)
            if self._task is not None:
                await self._task

    async def wait_idle(self, *, quiet: float = BURST_QUIET_SECONDS) -> None:
        """Until nothing is pending or held and no message arrived for ``quiet`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await self.idle.wait()
            wait = self._last_activity + quiet - loop.time()
            if wait <= 0 and self.idle.is_set():
                return
            await asyncio.sleep(max(wait, 0.02))

    # -- the supervisor --------------------------------------------------------------

    def _spawn_supervisor(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="dispatcher")

    async def _supervise(self) -> None:
        await self._watchers.start()
        try:
            await self._supervise_sessions()
        finally:
            await self._watchers.close()

    async def _supervise_sessions(self) -> None:
        backoff = self.settings.backoff()
        while not self._stop.is_set():
            session = self._session = Session(
                self.settings,
                nodes=self._nodes,
                busy_changed=self._busy_changed,
                activity=self._touch,
                first=self._owned,
                on_event=self.observer.event,
                on_ledger=self.observer.ledger_written,
                on_config_timeout=self.observer.config_timed_out,
            )
            if not await self._start_session(session):
                await session.close()
                self._session = None
                await self._pause(backoff.next())
                continue
            backoff.reset()
            self.sessions += 1
            self.ready.set()
            log.info("dispatcher ready (pid %d, session %d)", os.getpid(), self.sessions)
            stop = asyncio.ensure_future(self._stop.wait())
            broken = asyncio.ensure_future(session.broken.wait())
            await asyncio.wait({stop, broken}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            broken.cancel()
            self.ready.clear()
            if self._stop.is_set() and self._drain_on_stop and not session.broken.is_set():
                log.info("draining: admitting nothing more")
                await session.drain(self.settings.dispatcher_drain_timeout_seconds, self._hurry)
            self._owned = set(session.owners)
            await session.close()
            self._session = None
            if not self._stop.is_set():
                # Its node may be gone: the next session tries the next node first,
                # once the queues that node led have new leaders (SETTLE_SECONDS).
                self._nodes.moved_on()
                wait = max(backoff.next(), SETTLE_SECONDS)
                log.warning("connection lost; a new session in %.2fs", wait)
                await self._pause(wait)
        log.info("dispatcher stopped")

    async def _start_session(self, session: Session) -> bool:
        start = asyncio.ensure_future(session.start())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not start.done():
            start.cancel()
            with contextlib.suppress(BaseException):
                await start
            return False
        if (exc := start.exception()) is not None:
            log.warning("cannot start a dispatcher session: %r", exc)
            return False
        return True

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _until_burst_done(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
            session = self._session
            if session is None or not self.ready.is_set() or not self.idle.is_set():
                continue
            if loop.time() - self._last_activity < BURST_QUIET_SECONDS:
                continue
            if await session.queues_empty():
                log.info("burst: every owned queue is empty and nothing is held")
                return

    def _busy_changed(self, busy: bool) -> None:
        self._busy += 1 if busy else -1
        if self._busy <= 0:
            self._busy = 0
            self.idle.set()
        else:
            self.idle.clear()

    def _touch(self) -> None:
        self._last_activity = asyncio.get_running_loop().time()
