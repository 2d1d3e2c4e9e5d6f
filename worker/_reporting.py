"""Publishing what the worker has to say so that it is not lost.

Results go to a results queue that always exists while its execution is in
flight (the owning dispatcher declared it before dispatching), so a failure to
publish is the broker being unavailable: retry with backoff until it is back
(``broker.connection.retry``; the connection meanwhile finds a live node).
A queue that really is missing is reported as ``Unroutable`` after a few tries.

The results decided in one event-loop round go to their results queue as one
``Results`` message (``ResultBatches``): a quorum enqueue, a delivery and an
acknowledgement for all of them instead of one each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from broker.connection import DEFAULT_MAX_BACKOFF_SECONDS, Backoff, retry
from broker.deadletter import dead_letter
from broker.errors import BrokerUnavailable, PublishRejected, Unroutable
from broker.publisher import ConfirmedPublisher
from schemas.dispatch import encode_results
from schemas.limits import JSON_NESTING_LIMIT, RESULTS_BATCH_NESTING

UNROUTABLE_ATTEMPTS = 4
# A batch is sent once it holds this many reports or bytes, whatever the round.
MAX_BATCH_REPORTS = 256
MAX_BATCH_BYTES = 1024 * 1024
# A report whose brackets (an upper bound of its depth) exceed this goes alone: in a
# batch it would nest deeper than the owner's JSON parser reads.
MAX_BATCHED_BRACKETS = JSON_NESTING_LIMIT - RESULTS_BATCH_NESTING


class Reporter:
    def __init__(
        self, publisher: ConfirmedPublisher, *, max_backoff: float = DEFAULT_MAX_BACKOFF_SECONDS
    ) -> None:
        self._publisher = publisher
        self._max_backoff = max_backoff
        self._closed = asyncio.Event()

    def close(self) -> None:
        """Stop retrying: the worker is shutting down, its deliveries go back anyway."""
        self._closed.set()

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        """Publish persistent and mandatory; return once the broker confirmed it.

        Retries for as long as the broker is unavailable; raises ``Unroutable``
        when ``queue`` does not exist.
        """
        await self._retry(
            lambda: self._publisher.publish(queue, body, message_id=message_id), queue
        )

    async def dead_letter(
        self, body: bytes, *, source_queue: str, reason: str, message_id: str | None
    ) -> None:
        """Keep a poison message once in the dead-letter queue, with the reason."""
        await self._retry(
            lambda: dead_letter(
                self._publisher,
                body,
                source_queue=source_queue,
                reason=reason,
                message_id=message_id,
            ),
            "the dead-letter queue",
        )

    async def _retry(self, publish: Callable[[], Awaitable[None]], where: str) -> None:
        unroutable = 0

        def again(exc: Exception) -> bool:
            nonlocal unroutable
            if isinstance(exc, Unroutable):
                unroutable += 1
                return unroutable < UNROUTABLE_ATTEMPTS
            return isinstance(exc, BrokerUnavailable | PublishRejected)

        await retry(
            publish,
            what=f"publish to {where}",
            backoff=Backoff(self._max_backoff),
            retry_on=again,
            stop=self._closed,
        )


class _Batch:
    __slots__ = ("bodies", "done", "message_ids", "size")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.bodies: list[bytes] = []
        self.message_ids: list[str] = []
        self.size = 0
        self.done: asyncio.Future[None] = loop.create_future()


class ResultBatches:
    """A worker's reports, one message per results queue for as many as are ready.

    ``publish`` returns once the message carrying the report was confirmed (or
    raises what ``Reporter.publish`` raised for it: every report of a failed
    batch fails alike). The first report for a queue is sent at the next
    event-loop round, with every report decided meanwhile; while that message
    waits for its confirm, the reports that follow gather and go out together
    when it is confirmed (group commit: a lone report waits for nothing, and
    under load a message carries what one confirm's time brings). A batch of
    one goes out as the report itself. A caller that is cancelled while it
    waits leaves the batch to the others (the report may still be delivered:
    the owner drops a result it has no use for).
    """

    def __init__(self, reporter: Reporter, *, batch_id: str) -> None:
        self._reporter = reporter
        self._batch_id = batch_id
        self._sequence = itertools.count()
        self._open: dict[str, _Batch] = {}
        self._flying: dict[str, int] = {}  # queue -> its batches awaiting their confirm
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        if body.count(b"{") + body.count(b"[") > MAX_BATCHED_BRACKETS:
            await self._reporter.publish(queue, body, message_id=message_id)
            return
        batch = self._open.get(queue)
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._open[queue] = _Batch(loop)
            if queue not in self._flying:
                loop.call_soon(self._send_open, queue, batch)
            # else: sent when the batch on its way is confirmed.
        batch.bodies.append(body)
        batch.message_ids.append(message_id)
        batch.size += len(body)
        if len(batch.bodies) >= MAX_BATCH_REPORTS or batch.size >= MAX_BATCH_BYTES:
            self._send_open(queue, batch)
        done = batch.done
        # wait(), not await: one caller's cancellation must not cancel the others' batch.
        await asyncio.wait((done,))
        done.result()

    async def close(self) -> None:
        """Stop sending: the batches on their way fail (their callers were stopped
        already; their deliveries go back with the channel)."""
        self._closed = True
        for batch in self._open.values():
            batch.done.cancel()
        self._open.clear()
        for task in self._sending:
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)

    def _send_open(self, queue: str, batch: _Batch) -> None:
        if self._open.get(queue) is not batch:
            return  # sent already (it filled up before its round came)
        del self._open[queue]
        self._flying[queue] = self._flying.get(queue, 0) + 1
        task = asyncio.get_running_loop().create_task(self._send(queue, batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, queue: str, batch: _Batch) -> None:
        if len(batch.bodies) == 1:
            body, message_id = batch.bodies[0], batch.message_ids[0]
        else:
            body = encode_results(batch.bodies)
            message_id = f"results/{self._batch_id}/{next(self._sequence)}"
        try:
            await self._reporter.publish(queue, body, message_id=message_id)
        except asyncio.CancelledError:
            batch.done.cancel()
            raise
        except Exception as exc:
            batch.done.set_exception(exc)
            batch.done.exception()  # retrieved: its callers may all have gone
        else:
            batch.done.set_result(None)
        finally:
            self._landed(queue)

    def _landed(self, queue: str) -> None:
        left = self._flying[queue] - 1
        if left:
            self._flying[queue] = left
            return
        del self._flying[queue]
        waiting = self._open.get(queue)
        if waiting is not None and not self._closed:
            self._send_open(queue, waiting)
