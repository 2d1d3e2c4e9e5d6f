"""The operator page: ``/ui``, behind an admin key (``keys create --admin``).

    GET    /ui                     the page (plain HTML and JS from gateway/static/)
    POST   /ui/api/session         {"key": ...} → the polos_admin cookie (HttpOnly,
                                   SameSite=Strict); DELETE forgets it
    GET    /ui/api/queues          every queue: limit, strategy, holding a slot, queued depth,
                                   owning dispatcher, admitted/s, finished/s
    GET    /ui/api/projects        projects and their registered workflows
    GET    /ui/api/executions      ?project=&workflow=&status=&limit= newest first
    GET    /ui/api/projects/{project_id}/executions/{execution_id}[/events]
                                   one record, or its live event stream (the same
                                   handlers as the project API, with the project named
                                   in the path instead of by a project key)

Queues come from the registry the gateway follows anyway, owners, limits, slots
and rates from the dispatchers' statuses (``gateway/fleet.py``), depths from
passive declares. Every answer is read-only.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway import errors, executions
from gateway.auth import Principal, api_key_from
from gateway.context import APP_KEYS, APP_LINK, APP_STORE
from gateway.fleet import Fleet, Owned
from gateway.settings import Settings
from gateway.submission import unavailable
from schemas.dispatch import ExecutionStatus
from schemas.records import ExecutionRecord
from schemas.registry import DEFAULT_CONCURRENCY_STRATEGY
from schemas.topology import submit_queue
from store import MAX_LIST_LIMIT, StoreError

STATIC = Path(__file__).parent / "static"
COOKIE = "polos_admin"
MAX_QUEUES_SHOWN = 500
MAX_WORKFLOWS_MERGED = 20
_JSON = "application/json"

APP_FLEET = web.AppKey("fleet", Fleet)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)


def _admin(request: web.Request) -> str:
    key = api_key_from(request.headers.get("Authorization"), request.cookies.get(COOKIE))
    key_id = request.app[APP_KEYS].authenticate_admin(key)
    if key_id is None:
        raise errors.ADMIN_KEY_REQUIRED("The operator page needs an admin key.")
    return key_id


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC / "operator.html",
        headers={
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
            "Cache-Control": "no-cache",
        },
    )


async def open_session(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        key = body["key"] if isinstance(body, dict) else None
    except (ValueError, KeyError):
        key = None
    if not isinstance(key, str) or request.app[APP_KEYS].authenticate_admin(key) is None:
        raise errors.ADMIN_KEY_REQUIRED("That is not an admin key.")
    response = web.Response(status=204)
    response.set_cookie(COOKIE, key, path="/ui", httponly=True, samesite="Strict")
    return response


async def close_session(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/ui")
    return response


async def queues(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    link, fleet = app[APP_LINK], app[APP_FLEET]
    connection = link.connection
    if connection is None:
        raise unavailable("The message broker is unavailable.")
    await fleet.follow(connection)
    owned = fleet.owned()
    keys = set(link.state.queues) | set(owned)
    # One project's queues (?project=), chosen before the page's cap on rows applies.
    if project := request.query.get("project"):
        keys = {k for k in keys if k[0] == project}
    # Busiest first: those holding slots, then by name.
    ordered = sorted(
        keys, key=lambda k: (-(owned[k].status.holding if k in owned else 0), k[0], k[1])
    )[:MAX_QUEUES_SHOWN]
    depths = await fleet.depths(connection, [submit_queue(*k) for k in ordered])
    rows = []
    for key in ordered:
        name = submit_queue(*key)
        own = owned.get(key)
        config = link.state.queues.get(key)
        if own is None and depths.get(name, 0) is None:
            continue  # recorded in the registry, deleted since
        rows.append(
            {
                "project_id": key[0],
                "queue_name": key[1],
                "limit": own.status.limit
                if own
                else (config.concurrency_limit if config else None),
                # The registry's: owners apply a change at once.
                "strategy": (config.concurrency_strategy if config else None)
                or DEFAULT_CONCURRENCY_STRATEGY,
                "holding": own.status.holding if own else None,
                # Ready in the broker, plus what the owner prefetched and holds back.
                "queued": _queued(depths.get(name), own),
                "owner": own.dispatcher_id if own else None,
                "admitted_per_s": own.admitted_per_s if own else None,
                "finished_per_s": own.finished_per_s if own else None,
            }
        )
    dispatchers = [
        {
            "dispatcher_id": s.dispatcher_id,
            "ready": s.ready,
            "owned": len(s.queues) + s.truncated,
            "standby": s.standby,
            "sessions": s.sessions,
        }
        for s in fleet.dispatchers()
    ]
    return _json({"queues": rows, "dispatchers": dispatchers, "truncated": len(keys) > len(rows)})


def _queued(ready: int | None, own: Owned | None) -> int | None:
    if ready is None:
        return None
    return ready + (own.status.waiting if own is not None else 0)


async def projects(request: web.Request) -> web.Response:
    _admin(request)
    state = request.app[APP_LINK].state
    workflows: dict[str, set[str]] = {}
    for (project_id, _), deployment in state.deployments.items():
        workflows.setdefault(project_id, set()).update(deployment.workflows)
    return _json(
        {
            "projects": [
                {"project_id": p, "workflows": sorted(w)} for p, w in sorted(workflows.items())
            ]
        }
    )


async def recent(request: web.Request) -> web.Response:
    """The newest executions of a project (one workflow, or merged over its workflows)."""
    _admin(request)
    app = request.app
    query = request.query
    project_id = query.get("project", "")
    problems = []
    if not project_id:
        problems.append({"field": "project", "message": "required"})
    status = None
    if raw := query.get("status"):
        try:
            status = ExecutionStatus(raw)
        except ValueError:
            choices = ", ".join(s.value for s in ExecutionStatus)
            problems.append({"field": "status", "message": f"must be one of {choices}"})
    limit = 50
    if (raw_limit := query.get("limit")) is not None:
        if raw_limit.isdigit() and 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            limit = int(raw_limit)
        else:
            problems.append({"field": "limit", "message": f"1 to {MAX_LIST_LIMIT}"})
    if problems:
        fields = ", ".join(p["field"] for p in problems)
        raise errors.VALIDATION_ERROR(f"Invalid query parameter(s): {fields}.", problems)
    if workflow := query.get("workflow"):
        workflows = [workflow]
    else:
        state = app[APP_LINK].state
        workflows = sorted(
            {w for (p, _), d in state.deployments.items() if p == project_id for w in d.workflows}
        )[:MAX_WORKFLOWS_MERGED]
    store = app[APP_STORE]
    try:
        pages = await asyncio.gather(
            *(store.list_runs(project_id, w, status, limit, None) for w in workflows)
        )
    except StoreError:
        raise errors.STORE_UNAVAILABLE("The execution store is unavailable; retry later.") from None
    # UUIDv7 ids sort by creation time: the newest `limit` of all pages.
    records: list[ExecutionRecord] = heapq.nlargest(
        limit, (r for rs, _ in pages for r in rs), key=lambda r: r.id
    )
    return web.Response(
        body=b'{"executions":[' + b",".join(r.model_dump_json().encode() for r in records) + b"]}",
        content_type=_JSON,
    )


def _as_project(request: web.Request) -> None:
    key_id = _admin(request)
    project_id = request.match_info["project_id"]
    if not request.app[APP_KEYS].has_project(project_id):
        raise errors.PROJECT_NOT_FOUND("Project not found.")
    request[executions.OPERATOR_PRINCIPAL] = Principal(project_id, key_id)


async def execution(request: web.Request) -> web.Response:
    _as_project(request)
    return await executions.get_execution(request)


async def execution_events(request: web.Request) -> web.StreamResponse:
    _as_project(request)
    return await executions.execution_events(request)


def install(app: web.Application, settings: Settings) -> None:
    """The page's routes (a hunk of their own in ``create_app``)."""
    app[APP_FLEET] = Fleet()

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[APP_FLEET].close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/ui", page)
    app.router.add_static("/ui/static", STATIC)
    app.router.add_post("/ui/api/session", open_session)
    app.router.add_delete("/ui/api/session", close_session)
    app.router.add_get("/ui/api/queues", queues)
    app.router.add_get("/ui/api/projects", projects)
    app.router.add_get("/ui/api/executions", recent)
    base = "/ui/api/projects/{project_id}/executions/{execution_id}"
    app.router.add_get(base, execution)
    app.router.add_get(base + "/events", execution_events)
