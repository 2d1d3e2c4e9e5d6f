"""One connection's worth of dispatcher, built from scratch and torn down whole
(with a second connection that only asks whether queues exist, ``probe.py``).

The connection is a plain one, not robust: when it is lost the broker requeues
every submission and marker we held, and whoever owns each queue next (maybe
us, in a new session) recovers them from the broker. Nothing is restored here;
the supervisor (``service.py``) builds a new session.

Queues are discovered from the registry stream: after the replay, every queue
recorded there that matches ``POLOS_DISPATCHER_QUEUES`` and still exists gets
an owner, and so does every queue declared later; limit and strategy changes
reach the owner at once. Whether a queue exists is asked on a connection of its own
(``probe.py``): one passive declare per recorded queue and session, and one
more for each later registry event about a queue we do not own. Only a queue
that exists gets a results queue declared and a consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any

from aio_pika.abc import AbstractConnection

from broker.connection import Nodes, connect
from broker.errors import BrokerUnavailable
from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryFollower, RegistryState, RegistryWriter
from broker.topology import (
    declare_dead_letters,
    declare_dispatch_exchanges,
    declare_recorder_queue,
    declare_results_queue,
)
from dispatcher.consumers import CHANNEL_GONE, ConsumerPool
from dispatcher.notify import Notifier
from dispatcher.owner import QueueOwner
from dispatcher.probe import QueueProbe
from dispatcher.publishers import PinnedPublishers
from dispatcher.settings import Settings
from dispatcher.work import Links, WorkQueues
from schemas.dispatch import ExecutionStatus
from schemas.envelope import SubmissionEnvelope
from schemas.registry import (
    DEFAULT_CONCURRENCY_STRATEGY,
    ConcurrencyStrategy,
    QueueEvent,
    RegistryEvent,
)
from schemas.topology import results_queue, submit_queue

log = logging.getLogger(__name__)

QueueKey = tuple[str, str]
DISCOVERY_CONCURRENCY = 16
REPLAY_TIMEOUT_SECONDS = 60.0


class Session:
    def __init__(
        self,
        settings: Settings,
        *,
        nodes: Nodes,
        busy_changed: Callable[[bool], None],
        activity: Callable[[], None],
        first: Collection[QueueKey] = (),
        on_ledger: Callable[[str, str, bool, int], None],
        on_config_timeout: Callable[[str, str, int], None],
        on_event: Callable[[ExecutionStatus, SubmissionEnvelope], None] | None = None,
    ) -> None:
        self.settings = settings
        self._nodes = nodes
        self._on_event = on_event
        self._on_ledger = on_ledger
        self._on_config_timeout = on_config_timeout
        self._first = first
        self.broken = asyncio.Event()
        self.owners: dict[QueueKey, QueueOwner] = {}
        self._busy_changed = busy_changed
        self._activity = activity
        self._state = RegistryState()
        self._connection: AbstractConnection | None = None
        self._links: Links | None = None
        self._replayed = False
        self._up = False  # the first discovery is done
        self._closing = False
        self.probe: QueueProbe | None = None
        self._discovering: set[QueueKey] = set()
        # Registry events that came while their queue was being looked for.
        self._look_again: set[QueueKey] = set()
        self.missing: set[QueueKey] = set()  # recorded, matching, not on the broker
        self._semaphore = asyncio.Semaphore(DISCOVERY_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect, replay the registry, own the matching queues; raises on failure."""
        settings = self.settings
        replicas = settings.quorum_group_size
        connection = self._connection = await connect(self._nodes, "dispatcher")
        connection.close_callbacks.add(self._connection_closed)
        probe = self.probe = QueueProbe(self._nodes, on_lost=self.fail)
        await probe.open()
        # Registry appends and dead letters; dispatches and events have their own.
        publisher = ConfirmedPublisher(
            connection, confirm_timeout=settings.confirm_timeout_seconds, channels=1
        )
        await publisher.start()
        notifier = Notifier(
            connection,
            confirm_timeout=settings.confirm_timeout_seconds,
            channels=settings.dispatcher_event_channels,
            on_event=self._on_event,
            linger=settings.dispatcher_event_linger_seconds,
            max_events=settings.dispatcher_event_batch_max,
        )
        await notifier.start()
        dispatch = PinnedPublishers(
            connection,
            confirm_timeout=settings.confirm_timeout_seconds,
            channels=settings.dispatcher_publish_channels,
        )
        await dispatch.start()
        await declare_dead_letters(connection, replicas=replicas)
        async with connection.channel() as channel:
            await declare_dispatch_exchanges(channel)
        if settings.dispatcher_declare_recorder_queue:
            await declare_recorder_queue(connection, replicas=replicas)
        self._links = Links(
            settings=settings,
            owner_id=f"dispatcher-{uuid.uuid4().hex[:12]}",
            tunables=settings.tunables(),
            connection=connection,
            publisher=publisher,
            dispatch=dispatch,
            notifier=notifier,
            pool=ConsumerPool(
                connection,
                per_channel=settings.dispatcher_consumers_per_channel,
                on_lost=self._lost,
            ),
            work_queues=WorkQueues(connection, replicas=replicas),
            fail=self.fail,
            gone=self._gone,
            busy_changed=self._busy_changed,
            activity=self._activity,
            ledger_written=self._on_ledger,
            registry_heard=self._state.has_heard,
            config_timed_out=self._on_config_timeout,
            queue_exists=self._queue_exists,
        )
        follower = RegistryFollower(
            connection, RegistryWriter(publisher), self._state, replicas=replicas
        )
        follower.add_listener(self._on_registry_event)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await follower.start()
        async with asyncio.timeout(REPLAY_TIMEOUT_SECONDS):
            await follower.replayed.wait()
        self._replayed = True
        replayed = loop.time()
        # The queues the last session owned first, so that after a reconnect they
        # do not wait behind every deleted queue the registry remembers.
        keys = sorted(
            (key for key in self._state.queues if settings.owns(*key)),
            key=lambda key: key not in self._first,
        )
        await asyncio.gather(*(self._discover(key) for key in keys))
        if self.broken.is_set():
            raise BrokerUnavailable("the session broke while it discovered its queues")
        self._up = True
        log.info(
            "dispatcher session up: registry replayed in %.1fs, %d matching queue(s) "
            "looked for in %.1fs: %d owned, %d recorded but deleted (not consumed)",
            replayed - began,
            len(keys),
            loop.time() - replayed,
            len(self.owners),
            len(self.missing),
        )

    def fail(self, exc: BaseException | None) -> None:
        if not self._closing and not self.broken.is_set():
            log.warning("dispatcher session broken: %r", exc)
            self.broken.set()

    def _lost(self, exc: BaseException | None) -> None:
        self.fail(exc)

    def _connection_closed(self, _connection: object, exc: BaseException | None) -> None:
        self.fail(exc)

    # -- discovery -------------------------------------------------------------------

    def _on_registry_event(self, event: RegistryEvent) -> None:
        if not self._replayed or self._closing:
            return
        if not isinstance(event, QueueEvent):
            return
        key = (event.project_id, event.queue_name)
        if not self.settings.owns(*key):
            return
        owner = self.owners.get(key)
        if owner is not None:
            owner.set_limit(self._limit_of(key))
            owner.set_strategy(self._strategy_of(key))
            owner.registry_heard()
        else:
            self._spawn(self._discover(key))

    def _limit_of(self, key: QueueKey) -> int | None:
        config = self._state.queues.get(key)
        return self.settings.limit_for(config.concurrency_limit if config else None)

    def _strategy_of(self, key: QueueKey) -> ConcurrencyStrategy:
        config = self._state.queues.get(key)
        strategy = config.concurrency_strategy if config else None
        return strategy or DEFAULT_CONCURRENCY_STRATEGY

    async def _discover(self, key: QueueKey) -> None:
        if key in self.owners or self._links is None:
            return
        if key in self._discovering:
            # The answer on its way may predate what this event announces.
            self._look_again.add(key)
            return
        self._discovering.add(key)
        try:
            while not self._closing:
                self._look_again.discard(key)
                async with self._semaphore:
                    if await self._own(key) or key not in self._look_again:
                        return
        except Exception as exc:
            self.owners.pop(key, None)
            if not self._closing and not self.broken.is_set():
                log.error("cannot own %s/%s: %r", *key, exc)
                self.fail(exc)
        finally:
            self._discovering.discard(key)
            self._look_again.discard(key)

    async def _own(self, key: QueueKey) -> bool:
        """Consume the queue if it exists (and only then declare its results queue)."""
        assert self._links is not None
        if not await self._queue_exists(submit_queue(*key)):
            if key not in self.missing and self._up:
                log.info("%s/%s is recorded but does not exist; not consuming it", *key)
            self.missing.add(key)
            return False
        self.missing.discard(key)
        await declare_results_queue(
            self._links.connection, results_queue(*key), replicas=self.settings.quorum_group_size
        )
        # Registered before it starts, so a limit change reaches it meanwhile.
        owner = self.owners[key] = QueueOwner(
            self._links, *key, self._limit_of(key), self._strategy_of(key)
        )
        await owner.start()
        return True

    async def _queue_exists(self, name: str) -> bool:
        if self.probe is None:
            raise BrokerUnavailable("the session has no probe connection")
        return await self.probe.ready_count(name) is not None

    def _gone(self, project_id: str, queue_name: str) -> None:
        self.owners.pop((project_id, queue_name), None)

    # -- the end ---------------------------------------------------------------------

    @property
    def consumer_channels(self) -> int:
        return self._links.pool.channels if self._links is not None else 0

    @property
    def held(self) -> int:
        return sum(owner.held for owner in self.owners.values())

    async def drain(self, timeout: float, hurry: asyncio.Event) -> None:
        """Admit nothing more; wait (up to ``timeout``, or until ``hurry``) for what is
        in flight to end."""
        for owner in self.owners.values():
            owner.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and not self.broken.is_set() and not hurry.is_set():
            if self.held == 0:
                # Let the last acknowledgements go out before the connection closes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.1, deadline - loop.time())):
                        await asyncio.gather(*(o.wait_tasks() for o in self.owners.values()))
                return
            await asyncio.sleep(0.05)
        log.warning("drain: %d execution(s) still in flight; the next owner takes them", self.held)

    async def close(self) -> None:
        """Close the connection: the broker requeues whatever we still hold."""
        self._closing = True
        for owner in self.owners.values():
            owner.stop()
        for task in self._tasks:
            task.cancel()
        if self._links is not None:
            await self._links.pool.close()
        if self.probe is not None:
            await self.probe.close()
        if self._connection is not None:
            with contextlib.suppress(*CHANNEL_GONE):
                await self._connection.close()

    async def queues_empty(self, names: Iterable[str] | None = None) -> bool:
        """Whether no owned queue has ready messages (burst mode's last check)."""
        if self.probe is None:
            return False
        try:
            for name in names if names is not None else (o.name for o in self.owners.values()):
                if await self.probe.ready_count(name):
                    return False
        except BrokerUnavailable:
            return False  # the session is broken: the next one looks again
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
