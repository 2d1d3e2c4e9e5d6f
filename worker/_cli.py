"""``python -m worker [--burst] module:attr``: run a fleet's worker."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from observe import setup_logging
from observe.runtime import run, tune_gc
from worker._worker import Worker


def load(target: str) -> Worker:
    """``module:attr`` names a ``Worker``, or a function returning one."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"expected module:attr, got {target!r}")
    module = importlib.import_module(module_name)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"{module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Worker) and callable(obj):
        obj = obj()
    if not isinstance(obj, Worker):
        raise SystemExit(f"{target} is not a worker.Worker (got {type(obj).__name__})")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("target", help="module:attr of a Worker (or of a function returning one)")
    parser.add_argument(
        "--burst", action="store_true", help="exit once the work queue is empty and nothing runs"
    )
    parser.add_argument("--log-level", help="overrides POLOS_LOG_LEVEL")
    args = parser.parse_args(argv)
    worker = load(args.target)
    setup_logging(worker.settings.observe, level=args.log_level)
    tune_gc()  # the CLI's process only: Worker.run() in a user's own program leaves gc alone
    # The CLI's process only, like gc: a user's own program runs its own loop.
    run(worker.run(burst=args.burst), worker.settings.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
