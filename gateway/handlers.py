"""HTTP handlers: submit, health, readiness, the API description."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from broker.errors import BrokerUnavailable, ConfirmTimeout, PublishRejected, Unroutable
from gateway.auth import api_key_from
from gateway.context import APP_BODY_READS, APP_KEYS, APP_LINK, APP_OPENAPI, APP_SETTINGS
from gateway.errors import ApiError
from schemas.api import QUEUE_NAME_PATTERN, SubmitWorkflowRequest
from schemas.envelope import encode_submission
from schemas.ids import new_execution_id

_QUEUE_NAME_RE = re.compile(QUEUE_NAME_PATTERN)
_JSON = "application/json"

log = logging.getLogger(__name__)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)


def _validation_details(exc: ValidationError) -> tuple[str, str, list[dict[str, str]]]:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    # Even a body that is not JSON, or not an object, names what is wrong in
    # ``details`` (the field is the body itself), as every other 400 does.
    for e in errors:
        if e["type"] == "json_invalid":
            detail = {"field": "body", "message": e["msg"]}
            return "INVALID_JSON", "The request body is not valid JSON.", [detail]
        if e["type"] == "model_type" and not e["loc"]:
            detail = {"field": "body", "message": "must be a JSON object"}
            return "INVALID_REQUEST", "The request body must be a JSON object.", [detail]
    details = [
        {"field": ".".join(str(part) for part in e["loc"]) or "body", "message": e["msg"]}
        for e in errors
    ]
    fields = ", ".join(d["field"] for d in details)
    return "VALIDATION_ERROR", f"Invalid request field(s): {fields}.", details


def _unavailable(message: str, retry_after: int) -> ApiError:
    return ApiError(503, "BROKER_UNAVAILABLE", message, headers={"Retry-After": str(retry_after)})


async def submit_workflow(request: web.Request) -> web.Response:
    app = request.app
    settings = app[APP_SETTINGS]
    principal = app[APP_KEYS].authorize(_api_key(request), request.headers.get("X-Project-ID"))
    project_id = principal.project_id
    workflow_id = request.match_info["workflow_id"]

    if request.content_type != _JSON:
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json.")
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        raise _too_large(settings.max_body_bytes)
    try:
        raw = await app[APP_BODY_READS].read(request)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(settings.max_body_bytes) from None
    try:
        body = SubmitWorkflowRequest.model_validate_json(raw)
    except ValidationError as exc:
        error_type, message, details = _validation_details(exc)
        raise ApiError(400, error_type, message, details) from None

    run_timeout = body.run_timeout_seconds or settings.default_run_timeout_seconds
    if run_timeout > settings.max_run_timeout_seconds:
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            "Invalid request field(s): run_timeout_seconds.",
            [
                {
                    "field": "run_timeout_seconds",
                    "message": f"must be at most {settings.max_run_timeout_seconds}",
                }
            ],
        )
    queue_name = body.queue_name or workflow_id
    if body.queue_name is None and not _QUEUE_NAME_RE.match(queue_name):
        raise ApiError(
            400,
            "VALIDATION_ERROR",
            "Invalid request field(s): queue_name.",
            [
                {
                    "field": "queue_name",
                    "message": "the workflow id is not a valid queue name; set queue_name",
                }
            ],
        )

    link = app[APP_LINK]
    if not link.registry_replayed:
        # Deployments are not known yet (the broker was unreachable since the
        # start): "not found" would be a lie the client does not retry.
        raise _unavailable(
            "The gateway has not read the deployment registry yet.", settings.retry_after_seconds
        )
    deployment = link.state.resolve(project_id, body.deployment_id)
    if deployment is None:
        if body.deployment_id is None:
            raise ApiError(
                404, "DEPLOYMENT_NOT_FOUND", f"Project {project_id!r} has no registered deployment."
            )
        raise ApiError(404, "DEPLOYMENT_NOT_FOUND", f"Deployment {body.deployment_id!r} not found.")
    if workflow_id not in deployment.workflows:
        raise ApiError(
            404,
            "WORKFLOW_NOT_FOUND",
            f"Workflow {workflow_id!r} is not registered in deployment "
            f"{deployment.deployment_id!r}.",
        )

    queues, publisher = link.queues, link.publisher
    if queues is None or publisher is None or not publisher.available:
        raise _unavailable("The message broker is unavailable.", settings.retry_after_seconds)

    execution_id, created_at = new_execution_id()
    envelope = encode_submission(
        execution_id=execution_id,
        created_at=created_at,
        project_id=project_id,
        workflow_id=workflow_id,
        deployment_id=deployment.deployment_id,
        queue_name=queue_name,
        queue_concurrency_limit=body.queue_concurrency_limit,
        concurrency_key=body.concurrency_key,
        run_timeout_seconds=run_timeout,
        payload=body.payload,
        initial_state=body.initial_state,
        session_id=body.session_id or str(uuid.uuid4()),
        user_id=body.user_id,
        otel_traceparent=body.otel_traceparent,
        parent_execution_id=body.parent_execution_id,
        root_execution_id=body.root_execution_id,
        step_key=body.step_key,
        wait_for_subworkflow=bool(body.wait_for_subworkflow),
        submitted_by=principal.key_id,
    )
    try:
        # One deadline for everything this request asks of the broker: a broker
        # that stopped answering must not hold a first-use queue declaration (which
        # has no timeout of its own) or a registry append beyond it.
        async with asyncio.timeout(settings.confirm_timeout_seconds):
            routing_key = await queues.ensure(project_id, queue_name, body.queue_concurrency_limit)
            try:
                await publisher.publish(routing_key, envelope, message_id=execution_id)
            except Unroutable:
                # Deleted behind our back: declare again and retry once.
                queues.forget(routing_key)
                routing_key = await queues.ensure(project_id, queue_name, None)
                await publisher.publish(routing_key, envelope, message_id=execution_id)
    except (TimeoutError, ConfirmTimeout):
        raise _unavailable(
            "The message broker did not confirm the submission in time.",
            settings.retry_after_seconds,
        ) from None
    except PublishRejected:
        raise ApiError(
            429,
            "QUEUE_FULL",
            f"Queue {queue_name!r} is at its maximum length; retry later.",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    except (BrokerUnavailable, Unroutable) as exc:
        # The cause names broker internals (connection reprs, queue names): it is
        # for the operator's log, not for the client.
        log.warning("submission to %s/%s not accepted: %s", project_id, queue_name, exc)
        raise _unavailable(
            "The message broker is unavailable.", settings.retry_after_seconds
        ) from None
    return _json({"execution_id": execution_id, "created_at": created_at})


def _api_key(request: web.Request) -> str | None:
    return api_key_from(request.headers.get("Authorization"), request.cookies.get("polos_auth"))


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "PAYLOAD_TOO_LARGE", f"The request body exceeds the limit of {limit} bytes."
    )


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
