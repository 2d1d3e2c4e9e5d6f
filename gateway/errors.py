"""API errors: one catalogue of every error the gateway answers, one JSON shape, one renderer.

    ErrorKind (status, error_type, what it means, whether it says Retry-After)
      │  the catalogue below: the only place an error is defined
      ├─ kind("sentence", details) ─► ApiError ─► error_middleware ─┐
      │                                  (aiohttp's HTTPExceptions too) ├─► render() ─► JSON
      └─ gateway.server (errors found before any handler runs) ─────────┘
    gateway.routes names the kinds each operation can answer; /openapi.json lists them.

Every body is ``{"error": ..., "error_type": ..., "details": [...]}``. ``render``
is the one place ``Retry-After`` is set (for the kinds that ask for it) and the
headers a kind always carries (``WWW-Authenticate`` on 401). A message never
repeats a request header's value: a header may carry the API key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger(__name__)

Detail = Mapping[str, str]


@dataclass(frozen=True, slots=True, eq=False)
class ErrorKind:
    status: int
    error_type: str
    meaning: str  # what /openapi.json says of it
    retry: bool = False  # answered with Retry-After
    headers: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, message: str, details: Sequence[Detail] = ()) -> ApiError:
        return ApiError(self, message, details)


class ApiError(Exception):
    def __init__(self, kind: ErrorKind, message: str, details: Sequence[Detail] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = [dict(d) for d in details]
        self.headers: dict[str, str] = {}  # per answer, e.g. Allow on a 405

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def error_type(self) -> str:
        return self.kind.error_type


CATALOGUE: list[ErrorKind] = []


def _kind(
    status: int,
    error_type: str,
    meaning: str,
    *,
    retry: bool = False,
    headers: Mapping[str, str] | None = None,
) -> ErrorKind:
    kind = ErrorKind(status, error_type, meaning, retry, dict(headers or {}))
    CATALOGUE.append(kind)
    return kind


# -- before any handler: HTTP framing and limits (gateway/server.py), a bug --------------
BAD_HTTP_REQUEST = _kind(400, "BAD_HTTP_REQUEST", "Malformed HTTP (request line, headers, framing)")
REQUEST_TIMEOUT = _kind(408, "REQUEST_TIMEOUT", "Headers or body not received in time")
URI_TOO_LONG = _kind(414, "URI_TOO_LONG", "Request line over the limit")
HEADERS_TOO_LARGE = _kind(431, "HEADERS_TOO_LARGE", "Header fields over the size or count limit")
EXPECTATION_FAILED = _kind(417, "EXPECTATION_FAILED", "An Expect header other than 100-continue")
TOO_MANY_CONNECTIONS = _kind(
    503, "TOO_MANY_CONNECTIONS", "The process is at its connection limit", retry=True
)
INTERNAL_ERROR = _kind(500, "INTERNAL_ERROR", "A bug in the gateway (logged)")
# -- routing -------------------------------------------------------------------------------
ROUTE_NOT_FOUND = _kind(404, "NOT_FOUND", "No such route")
METHOD_NOT_ALLOWED = _kind(405, "METHOD_NOT_ALLOWED", "Method not allowed (see Allow)")
# -- who is asking (gateway/auth.py) ---------------------------------------------------
MISSING_PROJECT_ID = _kind(400, "MISSING_PROJECT_ID", "No X-Project-ID header")
UNAUTHORIZED = _kind(
    401,
    "UNAUTHORIZED",
    "Missing or invalid API key",
    headers={"WWW-Authenticate": 'Bearer realm="polos"'},
)
ADMIN_KEY_REQUIRED = _kind(
    401,
    "ADMIN_KEY_REQUIRED",
    "The operator page needs an admin key",
    headers={"WWW-Authenticate": 'Bearer realm="polos-admin"'},
)
FORBIDDEN = _kind(403, "FORBIDDEN", "API key bound to another project")
PROJECT_NOT_FOUND = _kind(404, "PROJECT_NOT_FOUND", "Unknown project")
# -- request bodies ------------------------------------------------------------------------
INVALID_JSON = _kind(400, "INVALID_JSON", "Body is not JSON")
INVALID_REQUEST = _kind(400, "INVALID_REQUEST", "Body is not a JSON object")
VALIDATION_ERROR = _kind(
    400, "VALIDATION_ERROR", "A field or query parameter is invalid (details name it)"
)
PAYLOAD_TOO_LARGE = _kind(413, "PAYLOAD_TOO_LARGE", "Body over POLOS_MAX_BODY_BYTES")
UNSUPPORTED_MEDIA_TYPE = _kind(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type is not JSON")
UNSUPPORTED_CONTENT_ENCODING = _kind(
    415,
    "UNSUPPORTED_CONTENT_ENCODING",
    "Content-Encoding other than identity, or transfer coding other than chunked (never inflated)",
)
# -- submissions (gateway/submission.py) -----------------------------------------------------
DEPLOYMENT_NOT_FOUND = _kind(404, "DEPLOYMENT_NOT_FOUND", "Deployment not found, or none")
WORKFLOW_NOT_FOUND = _kind(404, "WORKFLOW_NOT_FOUND", "Workflow not in the deployment")
QUEUE_FULL = _kind(429, "QUEUE_FULL", "Queue at its maximum length", retry=True)
BROKER_UNAVAILABLE = _kind(
    503, "BROKER_UNAVAILABLE", "Broker unavailable, or no confirm in time", retry=True
)
BATCH_QUEUE_FULL = _kind(
    429, "BATCH_INCOMPLETE", "Some items met a full queue; details say which ran", retry=True
)
BATCH_INCOMPLETE = _kind(
    503, "BATCH_INCOMPLETE", "Some items not confirmed; details say which ran", retry=True
)
# -- executions (gateway/executions.py) ------------------------------------------------------
INVALID_EXECUTION_ID = _kind(400, "INVALID_EXECUTION_ID", "The execution id is not a UUID")
EXECUTION_NOT_FOUND = _kind(404, "EXECUTION_NOT_FOUND", "No such execution in this project")
EXECUTION_TERMINAL = _kind(409, "EXECUTION_TERMINAL", "Already terminal (details: status)")
STORE_UNAVAILABLE = _kind(
    503, "STORE_UNAVAILABLE", "The execution store (Redis) is unavailable", retry=True
)
# -- idempotency keys (gateway/idempotency.py) ---------------------------------------------
INVALID_IDEMPOTENCY_KEY = _kind(
    400, "INVALID_IDEMPOTENCY_KEY", "Idempotency-Key is not 1-255 visible ASCII characters"
)
IDEMPOTENCY_KEY_IN_PROGRESS = _kind(
    409,
    "IDEMPOTENCY_KEY_IN_PROGRESS",
    "Another request with the key is still being submitted",
    retry=True,
)
IDEMPOTENCY_KEY_REUSED = _kind(
    422, "IDEMPOTENCY_KEY_REUSED", "The idempotency key was used with a different request"
)

# aiohttp raises these itself (router, body size); rendered as the kinds above.
_HTTP_EXCEPTION_KINDS = {
    404: ROUTE_NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    413: PAYLOAD_TOO_LARGE,
    417: EXPECTATION_FAILED,
}
# Headers of an aiohttp HTTPException worth keeping (a 405 lists the allowed methods).
_KEPT_HEADERS = ("Allow",)


def from_http_exception(exc: web.HTTPException) -> ApiError:
    kind = _HTTP_EXCEPTION_KINDS.get(exc.status)
    if kind is None:
        # Not one aiohttp raises in our routes today; still the one shape.
        kind = ErrorKind(exc.status, "HTTP_ERROR", HTTPStatus(exc.status).phrase)
    # The status phrase, not exc.text: aiohttp may put request text in it.
    error = kind(f"{HTTPStatus(exc.status).phrase}.")
    error.headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
    return error


def render(error: ApiError, retry_after_seconds: int) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of an error: the one place its headers are decided."""
    headers = {**error.kind.headers, **error.headers, "Content-Type": "application/json"}
    if error.kind.retry:
        headers["Retry-After"] = str(retry_after_seconds)
    body = orjson.dumps(
        {"error": error.message, "error_type": error.error_type, "details": error.details}
    )
    return error.status, headers, body


def error_response(error: ApiError, retry_after_seconds: int) -> web.Response:
    status, headers, body = render(error, retry_after_seconds)
    return web.Response(status=status, body=body, headers=headers)


def error_middleware(
    retry_after_seconds: int, check: Callable[[web.Request], None] | None = None
) -> Middleware:
    """Every error as the one JSON shape; ``check`` (what a request must meet before its
    handler runs) raises ``ApiError`` the same way. One middleware, not one per check:
    each layer is a coroutine frame every request passes through twice."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if check is not None:
                check(request)
            return await handler(request)
        except ApiError as exc:
            return error_response(exc, retry_after_seconds)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(from_http_exception(exc), retry_after_seconds)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(INTERNAL_ERROR("Internal server error."), retry_after_seconds)

    return middleware
