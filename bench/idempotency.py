"""Issue 12: what an ``Idempotency-Key`` costs a submission.

On the gateway of the submission phases, back to back (``--repeat`` times):
no key; a new key on every request (each one reserved in Redis before the
publish and completed after the confirm: two Redis round trips and a
fingerprint of the request); and then every request a retry of one key (one
Redis round trip, nothing published).
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.loadgen import STAMP
from bench.phase import HttpPhase, Run, measure_http, request_body
from bench.servers import ServerProcess
from schemas.api import IDEMPOTENCY_KEY_HEADER
from schemas.topology import submit_queue

NO_KEY, NEW_KEY, REPLAYED_KEY = "submit-no-key", "submit-new-key", "submit-replayed-key"
SYSTEMS = {
    NO_KEY: "gateway, no Idempotency-Key",
    NEW_KEY: "gateway, a new Idempotency-Key per request",
    REPLAYED_KEY: "gateway, every request a retry of one key",
}


_NOT_A_STAMP = b"1" + STAMP[1:]


def phases(repeat: int) -> int:
    return 2 * repeat + 1


async def _phase(
    run: Run, servers: Sequence[ServerProcess], key: str, *, replay_key: str | None = None
) -> None:
    tenant = await run.tenant()
    queue_name = run.next_queue()
    queue = submit_queue(tenant.project_id, queue_name)
    run.queues.append(queue)
    headers = tenant.headers
    if replay_key is not None:
        headers = (*headers, (IDEMPOTENCY_KEY_HEADER, replay_key))
    body = request_body(queue_name)
    run.progress.phase(f"{SYSTEMS[key]}: closed loop")
    result = await measure_http(
        run,
        HttpPhase(
            key=key,
            system=SYSTEMS[key],
            servers=servers,
            # A retry is the same request: no send time stamped into it.
            bodies=(body if replay_key is None else body.replace(STAMP, _NOT_A_STAMP),),
            headers=headers,
            unique_header=IDEMPOTENCY_KEY_HEADER if key == NEW_KEY else None,
        ),
    )
    run.record(result.measurement)
    await run.discard([queue])


async def idempotent_submits(run: Run, servers: Sequence[ServerProcess]) -> None:
    for _ in range(run.config.repeat):
        await _phase(run, servers, NO_KEY)
        await _phase(run, servers, NEW_KEY)
    await _phase(run, servers, REPLAYED_KEY, replay_key=f"replay-{run.run_id}")
