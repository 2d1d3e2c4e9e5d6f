"""One submission, from a validated request to a confirmed message: what single and
batch submits share.

    check (the rules pydantic cannot state; ``carried_json``: what every later
      layer can read) ─► resolve (deployment, workflow)
      ─► stamp (UUIDv7, defaults, the envelope) ─► publish with confirm
      ─► announce (the ``queued`` event: not awaited, never fails the submission)

Every step raises ``ApiError`` with the answer the client gets. ``field`` is
where the step's input sits in the request body (``""`` for a single submit,
``"workflows.3."`` for an item of a batch), so every error names its field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

from broker.errors import BrokerUnavailable, ConfirmTimeout, PublishRejected, Unroutable
from broker.registry import Deployment
from gateway import errors
from gateway.errors import ApiError
from gateway.link import BrokerLink
from gateway.settings import Settings
from schemas.api import QUEUE_NAME_PATTERN, BatchRunRequest, SubmitWorkflowRequest
from schemas.dispatch import encode_queued_event
from schemas.envelope import encode_submission, with_queue_config
from schemas.ids import new_execution_id, new_session_id
from schemas.limits import MAX_INT, MAX_VALUE_DEPTH, MIN_INT, ORJSON_READ_DEPTH, nests_deeper
from schemas.registry import ConcurrencyStrategy

_QUEUE_NAME_RE = re.compile(QUEUE_NAME_PATTERN)

log = logging.getLogger(__name__)

Detail = dict[str, str]


@dataclass(slots=True)
class Stamped:
    """A submission ready to publish: its id, its queue and its envelope."""

    execution_id: str
    created_at: str
    project_id: str
    workflow_id: str
    deployment_id: str
    queue_name: str
    limit: int | None
    strategy: ConcurrencyStrategy | None
    concurrency_key: str | None
    envelope: bytes


def unavailable(message: str) -> ApiError:
    return errors.BROKER_UNAVAILABLE(message)


class MaybePublished(ApiError):
    """A 503 after which the message may be in its queue all the same: no confirm came."""


def _maybe_published(message: str) -> MaybePublished:
    return MaybePublished(errors.BROKER_UNAVAILABLE, message)


def check(
    settings: Settings, workflow_id: str, body: SubmitWorkflowRequest, field: str = ""
) -> tuple[list[Detail], int, str]:
    """(problems, run timeout, queue name): the rules that depend on settings or the path."""
    problems: list[Detail] = []
    run_timeout = body.run_timeout_seconds or settings.default_run_timeout_seconds
    if run_timeout > settings.max_run_timeout_seconds:
        problems.append(
            {
                "field": f"{field}run_timeout_seconds",
                "message": f"must be at most {settings.max_run_timeout_seconds}",
            }
        )
    queue_name = body.queue_name or workflow_id
    if body.queue_name is None and not _QUEUE_NAME_RE.fullmatch(queue_name):
        problems.append(
            {
                "field": f"{field}queue_name",
                "message": "the workflow id is not a valid queue name; set queue_name",
            }
        )
    return problems, run_timeout, queue_name


# The values carried into the envelope whose shape is the client's.
_CARRIED = ("payload", "initial_state")
# Digits become "0" and "[" becomes "{", so one C pass over the body shows
# whether anything in it can nest deeper than the budget (more brackets than
# that) or be an integer beyond 64 bits (a run of 19 digits): almost no body.
_SCREEN = bytes.maketrans(b"123456789[", b"000000000{")
_LONG_DIGITS = b"0" * 19


def carried_json(raw: bytes, body: SubmitWorkflowRequest | BatchRunRequest) -> list[Detail]:
    """What in the carried values (``_CARRIED``) a later layer would refuse or change.

    DESIGN G6: the gateway answers 200 only for what every later layer reads
    as sent. Those layers decode with pydantic (``schemas.limits``: a value may
    nest ``MAX_VALUE_DEPTH`` levels) and encode with orjson, which cannot
    write integers beyond 64 bits (orjson reads them as floats: silently
    inexact). Unknown fields are not carried, so nothing in them is refused.
    """
    screened = raw.translate(_SCREEN)
    batch = isinstance(body, BatchRunRequest)
    problems: list[Detail] = []
    if screened.count(b"{") > MAX_VALUE_DEPTH:
        items = body.workflows if isinstance(body, BatchRunRequest) else [body]
        message = f"nests deeper than {MAX_VALUE_DEPTH} levels of arrays and objects"
        problems = [
            {"field": _field(batch, index, name), "message": message}
            for index, item in enumerate(items)
            for name in _CARRIED
            if nests_deeper(getattr(item, name), MAX_VALUE_DEPTH)
        ]
    if not problems and _LONG_DIGITS in screened:
        problems = _wide_integers(raw, batch)
    return problems


def _field(batch: bool, index: int, name: str) -> str:
    return f"workflows.{index}.{name}" if batch else name


class _WideInt:
    """An integer literal beyond 64 bits, as the exact re-reading found it."""


def _wide_integers(raw: bytes, batch: bool) -> list[Detail]:
    """The carried values that hold an integer literal orjson cannot keep exact.

    Only for bodies with a run of 19 digits (in a string, a float or an
    integer): the standard library's parser reads integers exactly, and marks
    those out of range so that the field they are in can be named.
    """
    wide = _WideInt()
    found = False

    def parse_int(text: str) -> int | _WideInt:
        nonlocal found
        value = int(text)
        if MIN_INT <= value <= MAX_INT:
            return value
        found = True
        return wide

    # The standard parser recurses once per level, and orjson has read the body
    # already, so it nests at most ORJSON_READ_DEPTH (deep unknown fields may).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + ORJSON_READ_DEPTH)
    try:
        exact = json.loads(raw, parse_int=parse_int)
    finally:
        sys.setrecursionlimit(limit)
    if not found:
        return []
    message = f"holds an integer beyond 64 bits ({MIN_INT} to {MAX_INT}); send it as a string"
    items = exact["workflows"] if batch else [exact]
    return [
        {"field": _field(batch, index, name), "message": message}
        for index, item in enumerate(items)
        for name in _CARRIED
        if _holds(item.get(name), wide)
    ]


def _holds(value: Any, marker: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if item is marker:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def invalid(problems: list[Detail]) -> ApiError:
    fields = ", ".join(p["field"] for p in problems)
    return errors.VALIDATION_ERROR(f"Invalid request field(s): {fields}.", problems)


def require_registry(link: BrokerLink) -> None:
    if not link.registry_replayed:
        # Deployments are not known yet (the broker was unreachable since the
        # start): "not found" would be a lie the client does not retry.
        raise unavailable("The gateway has not read the deployment registry yet.")


def resolve(
    link: BrokerLink,
    project_id: str,
    deployment_id: str | None,
    workflow_id: str,
    field: str = "",
) -> Deployment:
    """The deployment that runs ``workflow_id``; 404 naming what is missing."""
    deployment = link.state.resolve(project_id, deployment_id)
    if deployment is None:
        details = [{"field": f"{field}deployment_id", "message": "not found"}] if field else []
        if deployment_id is None:
            raise errors.DEPLOYMENT_NOT_FOUND(
                f"Project {project_id!r} has no registered deployment.", details
            )
        raise errors.DEPLOYMENT_NOT_FOUND(f"Deployment {deployment_id!r} not found.", details)
    if workflow_id not in deployment.workflows:
        details = [{"field": f"{field}workflow_id", "message": "not registered"}] if field else []
        raise errors.WORKFLOW_NOT_FOUND(
            f"Workflow {workflow_id!r} is not registered in deployment "
            f"{deployment.deployment_id!r}.",
            details,
        )
    return deployment


def require_broker(link: BrokerLink) -> None:
    publisher = link.publisher
    if link.queues is None or publisher is None or not publisher.available:
        raise unavailable("The message broker is unavailable.")


def stamp(
    *,
    project_id: str,
    workflow_id: str,
    deployment_id: str,
    queue_name: str,
    run_timeout: int,
    body: SubmitWorkflowRequest,
    submitted_by: str,
    session_id: str | None = None,
    defaults: BatchRunRequest | None = None,
    traceparent: str | None = None,
) -> Stamped:
    """Mint the execution id and encode the envelope.

    ``defaults`` (a batch's common fields) fill what ``body`` leaves out;
    ``traceparent`` (``gateway.observe.submit_traceparent``) wins over the body's.
    """
    execution_id, created_at = new_execution_id()
    d = defaults
    envelope = encode_submission(
        execution_id=execution_id,
        created_at=created_at,
        project_id=project_id,
        workflow_id=workflow_id,
        deployment_id=deployment_id,
        queue_name=queue_name,
        queue_concurrency_limit=body.queue_concurrency_limit,
        concurrency_key=body.concurrency_key,
        run_timeout_seconds=run_timeout,
        payload=body.payload,
        initial_state=body.initial_state,
        session_id=body.session_id or session_id or new_session_id(),
        user_id=_either(body.user_id, d and d.user_id),
        otel_traceparent=_either(
            traceparent, _either(body.otel_traceparent, d and d.otel_traceparent)
        ),
        parent_execution_id=_either(body.parent_execution_id, d and d.parent_execution_id),
        root_execution_id=_either(body.root_execution_id, d and d.root_execution_id),
        step_key=_either(body.step_key, d and d.step_key),
        wait_for_subworkflow=bool(
            body.wait_for_subworkflow
            if body.wait_for_subworkflow is not None or d is None
            else d.wait_for_subworkflow
        ),
        submitted_by=submitted_by,
        concurrency_strategy=body.concurrency_strategy,
    )
    return Stamped(
        execution_id,
        created_at,
        project_id,
        workflow_id,
        deployment_id,
        queue_name,
        body.queue_concurrency_limit,
        body.concurrency_strategy,
        body.concurrency_key,
        envelope,
    )


def _either(value: Any, default: Any) -> Any:
    return value if value is not None else default


async def publish(link: BrokerLink, settings: Settings, stamped: Stamped) -> None:
    """Declare the queue on first use, publish, and wait for the confirm.

    Raises ``ApiError`` (503, 429); call ``require_broker`` first.
    """
    queues, publisher = link.queues, link.publisher
    assert queues is not None
    assert publisher is not None
    project_id, queue_name = stamped.project_id, stamped.queue_name
    deadline = settings.confirm_timeout_seconds
    try:
        routing_key = queues.known(project_id, queue_name, stamped.limit, stamped.strategy)
        if routing_key is None:
            # First use (or a new limit or strategy): a declaration and a registry append,
            # neither with a timeout of its own, so a broker that stopped
            # answering must not hold them beyond the confirm deadline. The
            # common path skips this: the publisher times out its own confirms.
            async with asyncio.timeout(deadline):
                routing_key = await queues.ensure(
                    project_id, queue_name, stamped.limit, stamped.strategy
                )
        if stamped.limit is not None or stamped.strategy is not None:
            # What it carries travels on the registry: its dispatcher waits for that.
            config_id = queues.config_id(project_id, queue_name)
            if config_id is not None:
                stamped.envelope = with_queue_config(stamped.envelope, config_id)
        try:
            await publisher.publish(routing_key, stamped.envelope, message_id=stamped.execution_id)
        except Unroutable:
            # Deleted behind our back: declare again and retry once.
            queues.forget(routing_key)
            async with asyncio.timeout(deadline):
                routing_key = await queues.ensure(project_id, queue_name, None)
                await publisher.publish(
                    routing_key, stamped.envelope, message_id=stamped.execution_id
                )
    except (TimeoutError, ConfirmTimeout):
        raise _maybe_published(
            "The message broker did not confirm the submission in time."
        ) from None
    except PublishRejected:
        raise errors.QUEUE_FULL(
            f"Queue {queue_name!r} is at its maximum length; retry later."
        ) from None
    except (BrokerUnavailable, Unroutable) as exc:
        # The cause names broker internals (connection reprs, queue names): it is
        # for the operator's log, not for the client.
        log.warning("submission to %s/%s not accepted: %s", project_id, queue_name, exc)
        # A channel lost mid-publish may have delivered it; a returned message was not.
        error = unavailable if isinstance(exc, Unroutable) else _maybe_published
        raise error("The message broker is unavailable.") from None


def announce(link: BrokerLink, stamped: Stamped) -> None:
    """The ``queued`` event of a confirmed submission: its record exists from now on.

    Not awaited and never an error for the caller: at worst the record appears
    with the dispatcher's first event instead.
    """
    link.events.send(
        stamped.project_id,
        encode_queued_event(
            execution_id=stamped.execution_id,
            created_at=stamped.created_at,
            project_id=stamped.project_id,
            workflow_id=stamped.workflow_id,
            deployment_id=stamped.deployment_id,
            queue_name=stamped.queue_name,
            concurrency_key=stamped.concurrency_key,
            submission_raw=stamped.envelope,
        ),
    )
