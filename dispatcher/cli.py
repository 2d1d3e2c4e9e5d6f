"""``python -m dispatcher``: own the submission queues that match POLOS_DISPATCHER_QUEUES."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from dispatcher.service import Dispatcher
from dispatcher.settings import Settings
from observe import setup_logging
from observe.runtime import run, tune_gc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dispatcher", description=__doc__)
    parser.add_argument(
        "--burst",
        action="store_true",
        help="exit once every owned queue is empty and nothing is held (tests, batch jobs)",
    )
    return parser


async def _serve(settings: Settings, *, burst: bool) -> None:
    dispatcher = Dispatcher(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, dispatcher.request_stop)
    tune_gc()
    await dispatcher.run(burst=burst)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    setup_logging(settings.observe)
    run(_serve(settings, burst=args.burst), settings.event_loop)
    return 0
