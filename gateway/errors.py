"""API errors: one exception type, one JSON shape, one middleware that renders it.

Every error body is ``{"error": ..., "error_type": ..., "details": [...]}``.
aiohttp's own HTTP exceptions (unknown route, wrong method, body too large)
are rendered in the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import orjson
from aiohttp import web

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        details: Sequence[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.details = list(details)
        self.headers = headers


def error_response(
    status: int,
    error_type: str,
    message: str,
    details: Sequence[Mapping[str, str]] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = orjson.dumps({"error": message, "error_type": error_type, "details": list(details)})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def store_unavailable(retry_after: int) -> ApiError:
    return ApiError(
        503,
        "STORE_UNAVAILABLE",
        "The execution store is unavailable; retry later.",
        headers={"Retry-After": str(retry_after)},
    )


_HTTP_ERROR_TYPES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error_type, exc.message, exc.details, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = _HTTP_ERROR_TYPES.get(exc.status, "HTTP_ERROR")
        # Keep what the exception says in its headers (a 405 must list the
        # allowed methods in Allow), but not its text/plain Content-Type.
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return error_response(exc.status, error_type, exc.reason, headers=headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "Internal server error.")
