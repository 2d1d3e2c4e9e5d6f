"""A RabbitMQ virtual host of the run's own, so a benchmark touches nobody else.

Everything a run declares (submission, work and results queues, the registry
stream, the Celery queue) lives in it: no dispatcher elsewhere picks up its
queues, its dispatchers replay a registry holding only its own events, and
deleting the vhost at the end removes whatever a failed phase left behind.
Possible when the broker is local and ``rabbitmqctl`` works; otherwise the
URL is used as given (and the run deletes its queues one by one).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

from yarl import URL

_LOCAL = ("127.0.0.1", "localhost", "::1")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def own_vhost(url: str, run_id: str, *, enabled: bool = True) -> Iterator[tuple[str, str | None]]:
    """(the URL to use, the vhost created or None); the vhost is deleted on exit."""
    parsed = URL(url)
    if not enabled or parsed.host not in _LOCAL or not shutil.which("rabbitmqctl"):
        yield url, None
        return
    vhost = f"polos-bench-{run_id}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, parsed.user or "guest", ".*", ".*", ".*")
    except (subprocess.SubprocessError, OSError):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _rabbitmqctl("delete_vhost", vhost)
        yield url, None
        return
    try:
        yield str(parsed.with_path("/" + vhost)), vhost
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _rabbitmqctl("delete_vhost", vhost)
