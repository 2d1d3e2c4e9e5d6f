"""``python -m bench.observe_cost``: the CPU the gateway's metrics add to one submission.

On a shared 2-core machine the whole-system runs (``python -m bench gateway-1``
with ``--gateway-env POLOS_METRICS_PORT=...`` and without) differ by more from
one run to the next than metrics can cost, so this measures the added code
itself, in process, in CPU time: the observing middleware around a handler
(route lookup, two clock reads, the request counter, the latency histogram)
and the publisher's confirm-latency observation, against the same calls
without them. Divide by the gateway's CPU per submission (the benchmark's
"CPU us/req: SUT") for the share of throughput.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.observe import GatewayMetrics, _middleware

ROUNDS = 200_000


async def _handler(request: web.Request) -> web.Response:
    return web.Response(status=200)


def _cpu_us_per_call(calls: int, started: float) -> float:
    return (time.process_time() - started) / calls * 1e6


async def _requests(metrics: GatewayMetrics | None) -> float:
    app = web.Application()
    app.router.add_post("/api/v1/workflows/{workflow_id}/run", _handler)
    app.freeze()
    request = make_mocked_request("POST", "/api/v1/workflows/hello/run", app=app)
    match_info = await app.router.resolve(request)
    request._match_info = match_info  # the route the middleware labels with
    call: Any = _handler if metrics is None else _middleware(metrics)
    started = time.process_time()
    if metrics is None:
        for _ in range(ROUNDS):
            await call(request)
    else:
        for _ in range(ROUNDS):
            await call(request, _handler)
    return _cpu_us_per_call(ROUNDS, started)


def _publish_observer(metrics: GatewayMetrics) -> float:
    observer = metrics.publish_latency.observe
    started = time.process_time()
    for _ in range(ROUNDS):
        begun = time.perf_counter()
        observer(time.perf_counter() - begun)
    return _cpu_us_per_call(ROUNDS, started)


async def main() -> None:
    best: dict[str, float] = {}
    for _ in range(5):  # the least of five: the run least disturbed by other processes
        plain = await _requests(None)
        observed = await _requests(GatewayMetrics())
        publish = _publish_observer(GatewayMetrics())
        for name, value in (("plain", plain), ("observed", observed), ("publish", publish)):
            best[name] = min(best.get(name, value), value)
    middleware = best["observed"] - best["plain"]
    total = middleware + best["publish"]
    print(f"handler alone:                 {best['plain']:.2f} us CPU per request")
    print(f"handler inside the middleware: {best['observed']:.2f} us")
    print(f"middleware + counters:         {middleware:.2f} us per request")
    print(f"publish latency observation:   {best['publish']:.2f} us per publish")
    print(f"added per submission:          {total:.2f} us CPU")


if __name__ == "__main__":
    asyncio.run(main())
