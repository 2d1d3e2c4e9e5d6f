"""The HTTP limit: a bare aiohttp handler that parses the JSON body and answers.

No broker, no auth, no validation: what one aiohttp process serves at best
with the same requests and the same load generator. It also shows that the
generator is not the bottleneck: it drives this server well past the
gateway's figures. Run as ``python -m bench.bare_http --port N``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import orjson
from aiohttp import web

_ANSWER = orjson.dumps(
    {
        "execution_id": "01900000-0000-7000-8000-000000000000",
        "created_at": "2026-01-01T00:00:00.000000Z",
    }
)


async def submit(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.Response(body=_ANSWER, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status": "ready"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/v1/workflows/{workflow_id}/run", submit)
    app.router.add_get("/ready", ready)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_http")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
