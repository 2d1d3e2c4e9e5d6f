"""Sets of private RabbitMQ nodes: clusters, the state file, cleanup that cannot be missed.

``NodeSet`` is what the ``rabbit_node`` / ``rabbit_cluster`` fixtures hand out;
``start_nodes`` and the state file are what ``scripts/rabbit-nodes`` drives.
Run as ``python -m tests.broker_node_sets OWNER_PID DIR`` it is the watchdog
that removes a set whose owner died.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

from tests.broker_nodes import NodeError, RabbitNode, new_node, pid_alive

STATE_FILE = "nodes.json"


def start_nodes(nodes: Sequence[RabbitNode], *, within: float = 90.0) -> None:
    """Start nodes at once and wait for all; a cluster's seed must be the first.

    Nodes with a ``seed`` join it at their first boot (classic-config peer
    discovery), so they start only once the seed serves: no stop_app/join
    round trips through the CLI.
    """
    seeds = [node for node in nodes if node.seed is None]
    joiners = [node for node in nodes if node.seed is not None]
    for group in (seeds, joiners):
        for node in group:
            node.launch()
        for node in group:
            node.wait_ready(within=within)


def save_state(home: Path, nodes: Sequence[RabbitNode]) -> None:
    rows = [{**asdict(node), "home": str(node.home)} for node in nodes]
    partial = home / f"{STATE_FILE}.partial"
    partial.write_text(json.dumps(rows, indent=2) + "\n")
    partial.replace(home / STATE_FILE)


def load_state(home: Path) -> list[RabbitNode]:
    rows = json.loads((home / STATE_FILE).read_text())
    return [RabbitNode(**{**row, "home": Path(row["home"])}) for row in rows]


def cluster_members(node: RabbitNode) -> list[str]:
    """Running nodes of ``node``'s cluster, as that node sees them."""
    raw = node.eval("rabbit_nodes:all_running().")
    return sorted(part.strip(" '[]\n") for part in raw.split(",") if part.strip(" '[]\n"))


REPO_ROOT = Path(__file__).resolve().parent.parent


def vms_of(home: Path) -> list[int]:
    """OS pids of every Erlang VM whose HOME is ``home``: the set's nodes, recorded or not."""
    marker = b"\0-home\0" + str(home).encode() + b"\0"
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in b"\0" + (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def watch(owner: int, home: Path) -> None:
    """Wait for process ``owner`` to end, then kill the set's VMs and remove ``home``.

    The VMs are found by their ``-home`` argument, not the state file, so a
    node the owner was still launching when it died goes too.
    """
    while pid_alive(owner):
        time.sleep(1)
    for pid in vms_of(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(pid_alive(pid) for pid in vms_of(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(home, ignore_errors=True)


class NodeSet:
    """Nodes one test starts, all removed on ``close`` (the fixtures' teardown).

    Names carry a random token and ports are the kernel's free ones, so
    parallel sessions never meet. A watchdog process outlives this one: if the
    test process dies without teardown (killed, ``os._exit`` on a timeout), it
    still kills the nodes and deletes their files, so no VM is left eating the
    shared machine.
    """

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="polos-rabbit-"))
        self.token = secrets.token_hex(3)
        self.nodes: list[RabbitNode] = []
        self._watchdog: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NodeSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _add(
        self,
        consumer_timeout_ms: int | None,
        config: Mapping[str, str] | None,
        seed: str | None = None,
    ) -> RabbitNode:
        node = new_node(
            self.home,
            f"polos-{self.token}-{len(self.nodes) + 1}",
            consumer_timeout_ms=consumer_timeout_ms,
            config=config,
            seed=seed,
        )
        self.nodes.append(node)
        save_state(self.home, self.nodes)
        if self._watchdog is None:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", __name__, str(os.getpid()), str(self.home)],
                cwd=REPO_ROOT,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return node

    def node(
        self,
        *,
        consumer_timeout_ms: int | None = None,
        config: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> RabbitNode:
        """A new single node (started and serving unless ``start=False``)."""
        node = self._add(consumer_timeout_ms, config)
        if start:
            node.start()
        return node

    def cluster(
        self,
        size: int = 3,
        *,
        consumer_timeout_ms: int | None = None,
        config: Mapping[str, str] | None = None,
    ) -> list[RabbitNode]:
        """``size`` started nodes forming one cluster; the first is the seed."""
        first = self._add(consumer_timeout_ms, config)
        members = [first] + [
            self._add(consumer_timeout_ms, config, seed=first.name) for _ in range(size - 1)
        ]
        start_nodes(members)
        return members

    def close(self) -> None:
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.destroy()
            except (NodeError, OSError) as exc:
                errors.append(exc)
        shutil.rmtree(self.home, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
        if errors:
            raise NodeError(f"teardown of {self.home}: {errors}")


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
