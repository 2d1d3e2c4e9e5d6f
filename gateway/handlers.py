"""HTTP handlers: submit (single and batch), health, readiness, the API description."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway import errors, idempotency, submission
from gateway.auth import api_key_from
from gateway.context import (
    APP_IDEMPOTENCY,
    APP_KEYS,
    APP_LINK,
    APP_OPENAPI,
    APP_SETTINGS,
    APP_STORE,
)
from gateway.errors import ApiError
from gateway.observe import submit_traceparent
from gateway.request_body import read_json_body
from schemas.api import BatchRunRequest, SubmitWorkflowRequest
from schemas.ids import new_session_id

_JSON = "application/json"

_Model = TypeVar("_Model", bound=BaseModel)

log = logging.getLogger(__name__)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON, headers=headers)


def _validation_error(exc: ValidationError) -> ApiError:
    problems = exc.errors(include_url=False, include_context=False, include_input=False)
    # Even a body that is not JSON, or not an object, names what is wrong in
    # ``details`` (the field is the body itself), as every other 400 does.
    for e in problems:
        if e["type"] == "model_type" and not e["loc"]:
            detail = {"field": "body", "message": "must be a JSON object"}
            return errors.INVALID_REQUEST("The request body must be a JSON object.", [detail])
    details = [
        {"field": ".".join(str(part) for part in e["loc"]) or "body", "message": e["msg"]}
        for e in problems
    ]
    fields = ", ".join(d["field"] for d in details)
    return errors.VALIDATION_ERROR(f"Invalid request field(s): {fields}.", details)


def _parse(raw: bytes, model: type[_Model]) -> _Model:
    """The body as ``model``, or a 400.

    orjson, not pydantic, reads the JSON: it rejects NaN and Infinity (pydantic
    reads them and they would be stored as null), and whatever it reads it can
    write again into the envelope.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        detail = {"field": "body", "message": str(exc)}
        raise errors.INVALID_JSON("The request body is not valid JSON.", [detail]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def submit_workflow(request: web.Request) -> web.Response:
    app = request.app
    settings = app[APP_SETTINGS]
    principal = app[APP_KEYS].authorize(_api_key(request), request.headers.get("X-Project-ID"))
    project_id = principal.project_id
    workflow_id = request.match_info["workflow_id"]
    key = idempotency.header_key(request)

    raw = await read_json_body(request, settings)
    body = _parse(raw, SubmitWorkflowRequest)
    problems, run_timeout, queue_name = submission.check(settings, workflow_id, body)
    problems += submission.carried_json(raw, body)
    if problems:
        raise submission.invalid(problems)

    link = app[APP_LINK]
    submission.require_registry(link)
    deployment = submission.resolve(link, project_id, body.deployment_id, workflow_id)
    submission.require_broker(link)
    stamped = submission.stamp(
        project_id=project_id,
        workflow_id=workflow_id,
        deployment_id=deployment.deployment_id,
        queue_name=queue_name,
        run_timeout=run_timeout,
        body=body,
        submitted_by=principal.key_id,
        traceparent=submit_traceparent(request, body.otel_traceparent),
    )
    if key is not None:
        return await _submit_keyed(request, project_id, key, body, stamped)
    await submission.publish(link, settings, stamped)
    if settings.publish_queued_events:
        submission.announce(link, stamped)
    return _json({"execution_id": stamped.execution_id, "created_at": stamped.created_at})


async def _submit_keyed(
    request: web.Request,
    project_id: str,
    key: str,
    body: SubmitWorkflowRequest,
    stamped: submission.Stamped,
) -> web.Response:
    app = request.app
    settings, link, keys = app[APP_SETTINGS], app[APP_LINK], app[APP_IDEMPOTENCY]
    fingerprint = idempotency.fingerprint(stamped.workflow_id, body)
    claim = idempotency.claim_for(keys, project_id, key, stamped, fingerprint)
    await idempotency.claim(keys, app[APP_STORE], settings, project_id, [claim])
    if claim.replay is not None:
        execution_id, created_at = claim.replay
        return _json(
            {"execution_id": execution_id, "created_at": created_at},
            headers={idempotency.REPLAYED_HEADER: "true"},
        )
    try:
        await submission.publish(link, settings, stamped)
    except ApiError as exc:
        await idempotency.settle(keys, [claim], [exc])
        raise
    await idempotency.settle(keys, [claim], [None])
    if settings.publish_queued_events:
        submission.announce(link, stamped)
    return _json({"execution_id": stamped.execution_id, "created_at": stamped.created_at})


async def batch_run(request: web.Request) -> web.Response:
    """Every workflow of the batch, or (on any invalid item) none of them."""
    app = request.app
    settings = app[APP_SETTINGS]
    principal = app[APP_KEYS].authorize(_api_key(request), request.headers.get("X-Project-ID"))
    project_id = principal.project_id
    header_key = idempotency.header_key(request)

    raw = await read_json_body(request, settings)
    batch = _parse(raw, BatchRunRequest)
    items = batch.workflows
    if len(items) > settings.max_batch_items:
        raise submission.invalid(
            [{"field": "workflows", "message": f"at most {settings.max_batch_items} items"}]
        )
    problems: list[dict[str, str]] = []
    checked: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        item_problems, run_timeout, queue_name = submission.check(
            settings, item.workflow_id, item, f"workflows.{index}."
        )
        problems += item_problems
        checked.append((run_timeout, queue_name))
    problems += submission.carried_json(raw, batch)
    problems += idempotency.check_batch_keys(batch)
    if problems:
        raise submission.invalid(problems)

    link = app[APP_LINK]
    submission.require_registry(link)
    deployments = [
        submission.resolve(
            link,
            project_id,
            # "" names a deployment (an unknown one), as in a single submit.
            batch.deployment_id if item.deployment_id is None else item.deployment_id,
            item.workflow_id,
            f"workflows.{index}.",
        )
        for index, item in enumerate(items)
    ]
    submission.require_broker(link)
    # One session for the whole batch unless it names one (as Polos does per submit).
    session_id = batch.session_id or new_session_id()
    # One span for the batch; an item's own otel_traceparent is kept as it came.
    traceparent = submit_traceparent(request, batch.otel_traceparent)
    stamped = [
        submission.stamp(
            project_id=project_id,
            workflow_id=item.workflow_id,
            deployment_id=deployment.deployment_id,
            queue_name=queue_name,
            run_timeout=run_timeout,
            body=item,
            submitted_by=principal.key_id,
            session_id=session_id,
            defaults=batch,
            traceparent=item.otel_traceparent or traceparent,
        )
        for item, deployment, (run_timeout, queue_name) in zip(
            items, deployments, checked, strict=True
        )
    ]
    keys = app[APP_IDEMPOTENCY]
    claims = idempotency.batch_claims(keys, project_id, batch, header_key, stamped)
    keyed = [c for c in claims if c is not None]
    if keyed:
        await idempotency.claim(keys, app[APP_STORE], settings, project_id, keyed)
    # Replayed items (an earlier request published them) are answered, not published.
    fresh = [c is None or c.held for c in claims]
    # Every confirm in flight at once.
    to_publish = [s for s, f in zip(stamped, fresh, strict=True) if f]
    published = iter(
        await asyncio.gather(
            *(submission.publish(link, settings, s) for s in to_publish), return_exceptions=True
        )
    )
    outcomes = [next(published) if f else None for f in fresh]
    if keyed:
        await idempotency.settle(
            keys, keyed, [o for c, o in zip(claims, outcomes, strict=True) if c is not None]
        )
    answers = [
        c.replay if c is not None and c.replay is not None else (s.execution_id, s.created_at)
        for s, c in zip(stamped, claims, strict=True)
    ]
    if settings.publish_queued_events:
        for s, f, outcome in zip(stamped, fresh, outcomes, strict=True):
            if f and outcome is None:
                submission.announce(link, s)
    if any(outcome is not None for outcome in outcomes):
        raise _partial_failure(answers, outcomes)
    executions = [{"execution_id": i, "created_at": at} for i, at in answers]
    headers = {idempotency.REPLAYED_HEADER: "true"} if keyed and not any(fresh) else None
    return _json({"executions": executions}, headers=headers)


def _partial_failure(
    answers: list[tuple[str, str]], outcomes: list[BaseException | None]
) -> ApiError:
    """Some confirms failed: the error names each item, and which ones are accepted anyway."""
    for outcome in outcomes:
        if outcome is not None and not isinstance(outcome, ApiError):
            raise outcome  # a bug, not the broker: the middleware answers 500
    failed = [o for o in outcomes if isinstance(o, ApiError)]
    kind = (
        errors.BATCH_QUEUE_FULL if any(e.status == 429 for e in failed) else errors.BATCH_INCOMPLETE
    )
    details = []
    for index, ((execution_id, _), outcome) in enumerate(zip(answers, outcomes, strict=True)):
        if isinstance(outcome, ApiError):
            details.append({"field": f"workflows.{index}", "message": outcome.message})
        else:
            details.append(
                {"field": f"workflows.{index}", "message": f"accepted as {execution_id}"}
            )
    return kind(
        f"{len(failed)} of {len(answers)} workflows were not accepted; the others were and "
        "will run (see details). Retrying the whole batch runs those again, unless it "
        "carries idempotency keys.",
        details,
    )


def _api_key(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization")
    if authorization:  # the cookie is parsed only when there is no header (a browser)
        return api_key_from(authorization, None)
    return api_key_from(None, request.cookies.get("polos_auth"))


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    link = request.app[APP_LINK]
    if link.ready:
        return _json({"status": "ready"})
    follower = link.follower
    return _json(
        {
            "status": "not_ready",
            "broker_connected": link.publisher is not None and link.publisher.available,
            "registry_replayed": follower is not None and follower.replayed.is_set(),
        },
        status=503,
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[APP_OPENAPI], content_type=_JSON)
