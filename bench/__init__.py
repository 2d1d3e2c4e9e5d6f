"""Benchmarks: our throughput and latency beside the broker's limit, in one run.

``python -m bench`` (``--quick`` for a run under a minute). Layout:

- ``loadgen``: the HTTP load generator (separate processes; closed and open loop)
- ``harness``: runs load processes in lockstep over one measured window
- ``bare_publish``: the limit, a bare aio-pika confirmed-publish loop
- ``bare_http``: the HTTP limit, a bare aiohttp handler (no broker)
- ``servers``: the gateway (and other servers) as subprocesses, tenants, cleanup
- ``suite``: the systems and the order they run in; ``report``: table, targets, JSON
- ``cpu``: where the cores went during a window; ``profile``: py-spy sampling

See ``docs/benchmarks.md`` for how to read the results.
"""
