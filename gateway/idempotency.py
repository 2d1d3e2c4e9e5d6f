"""Idempotent submission: the same ``Idempotency-Key`` and the same request, one execution.

    reserve the key (pending: our fresh execution id, the request's fingerprint, a lease)
      ├─ reserved ──────────► publish ─► confirmed: complete (done, for the retention) ─► 200
      │                               └─ certainly not published (nack, unroutable): release
      │                               └─ maybe published (no confirm, channel lost): keep pending
      ├─ done, same request ─► 200 with its execution id and created_at; nothing published
      ├─ other request ──────► 422 IDEMPOTENCY_KEY_REUSED; nothing published
      ├─ pending (its holder is publishing) ─► look again until done, or 409 after the wait
      └─ pending, lease over (its holder is presumed dead) ─► its execution recorded?
              ├─ yes: it was published ─► complete it, answer it
              └─ no: take the key over with our own fresh id, publish that

The keys live in the execution store's Redis (``store/idempotency.py``), never on
the path of a submission without a key: Redis away fails only keyed submissions
(503 ``STORE_UNAVAILABLE``). The residual window, why a presumed-dead holder's
execution id is never published again, and the batch rules are in
``docs/architecture.md`` ("Idempotent submission").
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson
from aiohttp import web

from gateway import errors
from gateway.errors import ApiError
from gateway.settings import Settings
from gateway.submission import MaybePublished, Stamped
from schemas.api import (
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    BatchRunRequest,
    SubmitWorkflowRequest,
)
from store import ExecutionStore, StoreError
from store.idempotency import Held, Holder, IdempotencyKeys, Reservation

log = logging.getLogger(__name__)

_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
# How often a request that found its key pending looks again.
_POLL_SECONDS = 0.02
# A batch item's fields it leaves out take the batch's (see ``submission.stamp``).
_BATCH_DEFAULTS = (
    "deployment_id",
    "session_id",
    "user_id",
    "otel_traceparent",
    "parent_execution_id",
    "root_execution_id",
    "step_key",
    "wait_for_subworkflow",
)

REPLAYED_HEADER = "Idempotent-Replayed"


def header_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, or None; 400 if it is not a valid key."""
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None:
        return None
    if not _KEY_RE.fullmatch(key):
        raise errors.INVALID_IDEMPOTENCY_KEY(
            "The Idempotency-Key header must be 1 to 255 visible ASCII characters.",
            [{"field": IDEMPOTENCY_KEY_HEADER, "message": "1-255 visible ASCII characters"}],
        )
    return key


_LATER_FIELDS = ("concurrency_strategy",)


def fingerprint(
    workflow_id: str, body: SubmitWorkflowRequest, defaults: BatchRunRequest | None = None
) -> str:
    """What a request asks for, whatever its bytes: the same for the same submission.

    The fields as validated (unknown ones are ignored, as the gateway ignores
    them), with a batch's defaults filled in, in a canonical JSON form. So a
    single submit and a batch item that ask for the same run agree.
    """
    fields: dict[str, Any] = body.model_dump(
        mode="json", exclude={"workflow_id", "idempotency_key"}
    )
    if defaults is not None:
        for name in _BATCH_DEFAULTS:
            if fields.get(name) is None:
                fields[name] = getattr(defaults, name)
    fields["wait_for_subworkflow"] = bool(fields.get("wait_for_subworkflow"))
    fields["workflow_id"] = workflow_id
    # Fields added after keys were kept count only when sent: a key stored by an
    # earlier gateway still matches the same request after an upgrade.
    for name in _LATER_FIELDS:
        if fields.get(name) is None:
            fields.pop(name, None)
    return _digest(fields)


def batch_fingerprint(batch: BatchRunRequest) -> str:
    """The whole batch's: items keyed by the header are the same only in the same batch."""
    dumped = batch.model_dump(mode="json")
    for item in dumped["workflows"]:
        for name in _LATER_FIELDS:
            if item.get(name) is None:
                item.pop(name, None)
    return _digest(dumped)


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def check_batch_keys(batch: BatchRunRequest) -> list[dict[str, str]]:
    """Problems with the items' own keys: two items of one batch cannot share one."""
    first: dict[str, int] = {}
    problems = []
    for index, item in enumerate(batch.workflows):
        key = item.idempotency_key
        if key is None:
            continue
        if key in first:
            problems.append(
                {
                    "field": f"workflows.{index}.idempotency_key",
                    "message": f"the same key as workflows.{first[key]}",
                }
            )
        else:
            first[key] = index
    return problems


@dataclass(slots=True, eq=False)
class Claim:
    """One keyed submission: the key, and what became of it."""

    key: str  # as the client sent it, for messages
    field: str  # where the client sent it, for error details
    wanted: Reservation  # the key for our freshly minted execution
    stamped: Stamped
    # An earlier request's (execution_id, created_at): answer it, publish nothing.
    replay: tuple[str, str] | None = None
    # We hold the key's reservation: publish, then ``settle``.
    held: bool = False


def claim_for(
    keys: IdempotencyKeys,
    project_id: str,
    key: str,
    stamped: Stamped,
    fingerprint: str,
    *,
    redis_key: str | None = None,
    field: str = IDEMPOTENCY_KEY_HEADER,
) -> Claim:
    reservation = Reservation(
        redis_key or keys.key(project_id, key),
        stamped.execution_id,
        stamped.created_at,
        fingerprint,
    )
    return Claim(key, field, reservation, stamped)


def batch_claims(
    keys: IdempotencyKeys,
    project_id: str,
    batch: BatchRunRequest,
    header: str | None,
    stamped: Sequence[Stamped],
) -> list[Claim | None]:
    """Per item, its claim (None: the item has no key).

    An item's own ``idempotency_key`` keys it like a single submit's header.
    Otherwise the batch's header keys item ``i`` as "item i of the batch with
    that key", fingerprinted by the whole batch: retrying the same batch with
    the same header answers every item as before and publishes only the items
    no earlier attempt published.
    """
    whole = batch_fingerprint(batch) if header is not None else ""
    claims: list[Claim | None] = []
    for index, (item, s) in enumerate(zip(batch.workflows, stamped, strict=True)):
        if item.idempotency_key is not None:
            claims.append(
                claim_for(
                    keys,
                    project_id,
                    item.idempotency_key,
                    s,
                    fingerprint(item.workflow_id, item, batch),
                    field=f"workflows.{index}.idempotency_key",
                )
            )
        elif header is not None:
            claims.append(
                claim_for(
                    keys,
                    project_id,
                    header,
                    s,
                    whole,
                    redis_key=keys.batch_item_key(project_id, index, header),
                    field=f"{IDEMPOTENCY_KEY_HEADER} (workflows.{index})",
                )
            )
        else:
            claims.append(None)
    return claims


class Verdict(Enum):
    RESERVED = "reserved"  # ours: publish
    REPLAY = "replay"  # done by an earlier request: answer its execution
    CONFLICT = "conflict"  # another request's key: 422
    WAIT = "wait"  # its holder is publishing: look again
    TAKE_OVER = "take_over"  # its holder is presumed dead


def decide(fingerprint: str, holder: Holder | None) -> Verdict:
    """What a request with ``fingerprint`` does about the key that ``holder`` holds."""
    if holder is None:
        return Verdict.RESERVED
    if holder.fingerprint != fingerprint:
        return Verdict.CONFLICT
    if holder.state is Held.DONE:
        return Verdict.REPLAY
    if holder.state is Held.STALE:
        return Verdict.TAKE_OVER
    return Verdict.WAIT


async def claim(
    keys: IdempotencyKeys,
    store: ExecutionStore,
    settings: Settings,
    project_id: str,
    claims: Sequence[Claim],
) -> None:
    """Settle every claim as ``held`` (publish it) or ``replay`` (answer it), or raise.

    Raises ``ApiError``: 422 (a key stands for another request), 409 (a key is
    still being published by another request after ``idempotency_wait_seconds``),
    503 (Redis away). Then no claim is held: nothing is to be published.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.idempotency_wait_seconds
    open_claims = list(claims)
    try:
        while True:
            holders = await keys.reserve([c.wanted for c in open_claims])
            verdicts = [
                decide(c.wanted.fingerprint, h) for c, h in zip(open_claims, holders, strict=True)
            ]
            for c, verdict in zip(open_claims, verdicts, strict=True):
                # Before anything can raise: what we reserved is released on the way out.
                c.held = verdict is Verdict.RESERVED
            conflicts = [
                c for c, v in zip(open_claims, verdicts, strict=True) if v is Verdict.CONFLICT
            ]
            if conflicts:
                raise _reused(conflicts)
            waiting: list[Claim] = []
            for c, holder, verdict in zip(open_claims, holders, verdicts, strict=True):
                if verdict is Verdict.RESERVED:
                    continue
                assert holder is not None
                if verdict is Verdict.REPLAY:
                    c.replay = (holder.execution_id, holder.created_at)
                elif verdict is Verdict.TAKE_OVER:
                    if not await _take_over(keys, store, project_id, c, holder):
                        waiting.append(c)  # another request took it over first: look again
                else:
                    waiting.append(c)
            if not waiting:
                return
            if loop.time() >= deadline:
                raise _in_progress(waiting)
            await asyncio.sleep(_POLL_SECONDS)
            open_claims = waiting
    except BaseException as exc:
        await _release_quietly(keys, [_pair(c) for c in claims if c.held])
        for c in claims:
            c.held = False
        if isinstance(exc, StoreError):
            log.warning("idempotency keys: %s", exc)
            raise errors.STORE_UNAVAILABLE(
                "The execution store, which keeps idempotency keys, is unavailable; retry later."
            ) from None
        raise


async def _take_over(
    keys: IdempotencyKeys, store: ExecutionStore, project_id: str, c: Claim, holder: Holder
) -> bool:
    """The holder's lease is over: it died (or stalled) between reserving and completing.

    If its execution is recorded, it was published: the key stands for it.
    Otherwise it may never have been published; we publish ours instead, under
    a new id (see the module docstring for why never under the holder's).
    """
    if await store.get(project_id, holder.execution_id) is not None:
        await keys.complete([(c.wanted.redis_key, holder.execution_id)])
        c.replay = (holder.execution_id, holder.created_at)
        return True
    if not await keys.take_over(holder, c.wanted):
        return False
    log.warning(
        "idempotency key %r of %s: its holder let the lease pass with execution %s "
        "unrecorded; publishing %s instead",
        c.key,
        project_id,
        holder.execution_id,
        c.wanted.execution_id,
    )
    c.held = True
    return True


async def settle(
    keys: IdempotencyKeys, claims: Sequence[Claim], outcomes: Sequence[BaseException | None]
) -> None:
    """After publishing the held claims: the confirmed ones are done, the certainly
    unpublished ones free; a maybe-published one stays pending until its lease passes.

    Never raises for Redis: the answer is the broker's. A key left pending by a
    Redis outage is resolved by the next request with it (its execution is
    recorded by then, or it is taken over).
    """
    done, free = [], []
    for c, outcome in zip(claims, outcomes, strict=True):
        if not c.held:
            continue
        if outcome is None:
            done.append(_pair(c))
        elif isinstance(outcome, ApiError) and not isinstance(outcome, MaybePublished):
            free.append(_pair(c))
    try:
        await keys.complete(done)
    except StoreError as exc:
        log.warning("idempotency keys: %d published but not marked done: %s", len(done), exc)
    await _release_quietly(keys, free)


def _pair(c: Claim) -> tuple[str, str]:
    return c.wanted.redis_key, c.wanted.execution_id


async def _release_quietly(keys: IdempotencyKeys, pairs: list[tuple[str, str]]) -> None:
    try:
        await keys.release(pairs)
    except StoreError as exc:
        # The reservations stay pending until their lease passes, then are taken over.
        log.warning("idempotency keys: %d not released: %s", len(pairs), exc)


def _reused(conflicts: Sequence[Claim]) -> ApiError:
    details = [
        {"field": c.field, "message": "already used with a different request"} for c in conflicts
    ]
    keys = ", ".join(repr(c.key) for c in conflicts[:3])
    return errors.IDEMPOTENCY_KEY_REUSED(
        f"Idempotency key {keys} was already used with a different request in this project "
        "within the retention window; nothing was submitted.",
        details,
    )


def _in_progress(waiting: Sequence[Claim]) -> ApiError:
    details = [{"field": c.field, "message": "a request with it is in progress"} for c in waiting]
    return errors.IDEMPOTENCY_KEY_IN_PROGRESS(
        "A request with the same idempotency key is still being submitted; retry later "
        "for its answer.",
        details,
    )
