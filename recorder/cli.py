"""``python -m recorder``: record lifecycle events until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from broker.connection import retry
from broker.errors import BrokerUnavailable
from observe import MetricsServer, setup_logging
from observe.runtime import run, tune_gc
from recorder.observe import RecorderCollector, recorder_registry
from recorder.service import Recorder
from recorder.settings import RecorderSettings

log = logging.getLogger("recorder")


async def serve(settings: RecorderSettings) -> int:
    current: list[Recorder] = []  # the recorder of the moment, for the metrics
    server = None
    if settings.observe.metrics_port:
        collector = RecorderCollector(lambda: current[0] if current else None)
        server = MetricsServer(
            recorder_registry(collector),
            host=settings.observe.metrics_host,
            port=settings.observe.metrics_port,
            refresh=[collector.refresh],
        )
        await server.start()
    try:
        return await _record(settings, current)
    finally:
        if server is not None:
            await server.close()


async def _record(settings: RecorderSettings, current: list[Recorder]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    recorder = Recorder(settings)
    current[:] = [recorder]
    # The broker may still be starting: keep trying until it answers or we are told to stop.
    try:
        await retry(
            recorder.start,
            what="starting the recorder",
            backoff=settings.backoff(),
            retry_on=lambda exc: isinstance(exc, BrokerUnavailable),
            stop=stop,
        )
    except BrokerUnavailable:
        if stop.is_set():
            return 0
        raise

    tune_gc()
    stopped = asyncio.create_task(stop.wait())
    loop_ended = asyncio.create_task(recorder.wait_stopped())
    await asyncio.wait({stopped, loop_ended}, return_when=asyncio.FIRST_COMPLETED)
    failed = loop_ended.done() and loop_ended.exception() is not None
    stopped.cancel()
    if not loop_ended.done():
        loop_ended.cancel()
    log.info("stopping")
    await recorder.stop()
    return 1 if failed else 0


def main() -> int:
    settings = RecorderSettings()
    setup_logging(settings.observe)
    return run(serve(settings), settings.event_loop)
