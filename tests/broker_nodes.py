"""RabbitMQ nodes of our own on loopback: broker faults, other settings, clusters.

The machine's shared node (``rabbit@<host>`` on 5672) is never touched: every
node here has its own name, ports, data, logs, config, an empty plugins file and
its own env file (so ``/etc/rabbitmq/rabbitmq-env.conf`` does not apply), and
``HOME`` is the node set's directory, which holds an Erlang cookie of the set's
own. The CLI run with that ``HOME`` cannot even authenticate to the shared node.

One node's lifecycle lives here; sets of nodes, clusters and their cleanup in
``tests/broker_node_sets.py``; the pytest fixtures (``rabbit_node``,
``rabbit_cluster``) in ``tests/conftest.py``. Plain standard library, so
``scripts/rabbit-nodes`` uses the same code.

Everything here blocks (a CLI call takes about a second). An async test that
keeps a gateway or consumer running while it faults a node calls these through
``asyncio.to_thread`` so its event loop keeps turning.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Where the Debian package keeps the real scripts; ``/usr/sbin`` wrappers
#: would ``su rabbitmq``, who cannot read a test's directory.
DEFAULT_BIN_DIR = "/usr/lib/rabbitmq/bin"
# Erlang sizes its port table from this; an unlimited hard limit is no size.
MAX_OPEN_FILES = 65536
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class NodeError(RuntimeError):
    """A node did not start, stop or answer; the message carries its log's tail."""


def bin_dir() -> Path:
    configured = os.environ.get("RABBITMQ_BIN_DIR")
    if configured:
        return Path(configured)
    if Path(DEFAULT_BIN_DIR, "rabbitmq-server").exists():
        return Path(DEFAULT_BIN_DIR)
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise NodeError("rabbitmq-server not found (install RabbitMQ or set RABBITMQ_BIN_DIR)")
    return Path(found).resolve().parent


def free_port() -> int:
    """A port nobody listens on now (the kernel's choice, so parallel runs differ)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Nobody listens on ``port`` (connections in TIME_WAIT do not count, as for Erlang)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def open_files_limit() -> int:
    """The hard limit (capped): quorum queues need far more handles than the usual 1024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return MAX_OPEN_FILES
    return min(hard, MAX_OPEN_FILES)


def amqp_answers(port: int, *, timeout: float = 1.0) -> bool:
    """Whether an AMQP 0-9-1 listener on ``port`` answers the protocol header.

    A plain TCP connect is not enough: a port can be open while the node is
    still booting. ``connection.start`` (frame type 1) means it is serving.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(AMQP_HEADER)
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie answers kill(0) yet is gone for every purpose here.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@dataclass
class RabbitNode:
    """One node: ``name`` (``polos-x-1@localhost``), AMQP ``port``, files under ``base``.

    ``home`` holds the Erlang cookie shared by the nodes of one set (a cluster
    needs one cookie); ``base`` is this node's own directory.
    """

    name: str
    port: int
    dist_port: int
    home: Path
    consumer_timeout_ms: int | None = None
    config: dict[str, str] = field(default_factory=dict)
    seed: str | None = None  # a node to join at first boot (peer discovery)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def base(self) -> Path:
        return self.home / self.name.split("@", 1)[0]

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    # -- files and environment --------------------------------------------------

    def config_text(self) -> str:
        lines = {
            "listeners.tcp.1": f"127.0.0.1:{self.port}",
            "log.console": "false",
            "log.file.level": "info",
        }
        if self.consumer_timeout_ms is not None:
            lines["consumer_timeout"] = str(self.consumer_timeout_ms)
        if self.seed is not None:
            lines["cluster_formation.peer_discovery_backend"] = "classic_config"
            lines["cluster_formation.classic_config.nodes.1"] = self.seed
        lines.update(self.config)
        return "".join(f"{key} = {value}\n" for key, value in lines.items())

    def write_files(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(self.config_text())
        (self.base / "advanced.config").write_text("[].\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        ensure_cookie(self.home)

    def env(self) -> dict[str, str]:
        # Nothing inherited may steer this node toward the shared one's files.
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        base = str(self.base)
        return {
            **inherited,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
            "RABBITMQ_LOG_BASE": f"{base}/log",
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{base}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
            "RABBITMQ_CONF_ENV_FILE": f"{base}/rabbitmq-env.conf",
            "RABBITMQ_PLUGINS_EXPAND_DIR": f"{base}/plugins-expand",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Distribution on loopback only; -polos_node marks the OS process as ours.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                f"-kernel inet_dist_use_interface {{127,0,0,1}} -polos_node {self.name}"
            ),
        }

    # -- lifecycle ------------------------------------------------------------

    def launch(self) -> None:
        """Start the node in the background (``wait_ready`` waits for it)."""
        if self.os_pid() is not None:
            raise NodeError(f"{self.name} is already running")
        self.write_files()
        self.pid_file.unlink(missing_ok=True)
        server = shlex.quote(str(bin_dir() / "rabbitmq-server"))
        subprocess.run(
            ["sh", "-c", f"ulimit -n {open_files_limit()} && exec {server} -detached"],
            env=self.env(),
            cwd=self.base,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def wait_ready(self, *, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not amqp_answers(self.port):
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name} not serving AMQP after {within}s\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, *, within: float = 60.0) -> None:
        self.launch()
        self.wait_ready(within=within)

    def restart(self, *, within: float = 60.0) -> None:
        """Start again on the same data (after ``kill9`` or ``stop``)."""
        self.start(within=within)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <this node> ...``; its stdout."""
        try:
            done = subprocess.run(
                [str(bin_dir() / "rabbitmqctl"), "-q", "-n", self.name, *args],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"rabbitmqctl {' '.join(args)} on {self.name} timed out") from exc
        if done.returncode != 0:
            raise NodeError(
                f"rabbitmqctl {' '.join(args)} on {self.name} failed:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression).strip()

    def stop_app(self) -> None:
        """Stop RabbitMQ but keep the Erlang VM: connections drop, the port closes."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_ready()

    def stop(self) -> None:
        """Graceful shutdown (clients get connection.close 320) and wait for the VM to exit."""
        pid = self.os_pid()
        self.ctl("stop")
        if pid is not None:
            self._wait_gone(pid)

    def kill9(self, *, flush: bool = True) -> None:
        """SIGKILL this node's VM only (found by its pid file): a crash, no goodbye.

        RabbitMQ 3.10 (Ra 2.0) writes a quorum queue's registration to disk
        on a timer (dets auto_save, 0.5 s; Ra's metadata 5 s), so a queue
        declared just before a SIGKILL comes back empty and leaderless
        forever (seen here at 0 s, not at 1.5 s). Unless
        ``flush=False`` (that race itself is the test) the VM writes its
        tables out first, as any node running for a second would have.
        """
        pid = self.os_pid()
        if pid is None:
            raise NodeError(f"{self.name} has no running VM to kill")
        if flush:
            self.eval("[dets:sync(T) || T <- dets:all()], ok.")
        os.kill(pid, signal.SIGKILL)
        self._wait_gone(pid)
        self.pid_file.unlink(missing_ok=True)

    def destroy(self) -> None:
        """Kill the VM if it runs and remove the node's directory (teardown)."""
        pid = self.os_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid)
        shutil.rmtree(self.base, ignore_errors=True)

    def os_pid(self) -> int | None:
        """The VM's OS pid: the pid file, or (early in boot) our marker in /proc."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().strip())
            if pid_alive(pid):
                return pid
        marker = f"\0-polos_node\0{self.name}\0".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if marker in b"\0" + (proc / "cmdline").read_bytes() and pid_alive(int(proc.name)):
                    return int(proc.name)
        return None

    def _wait_gone(self, pid: int, *, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name} (pid {pid}) still alive after {within}s")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_file})"
        return "\n".join(text.splitlines()[-lines:])


def ensure_cookie(home: Path) -> None:
    cookie = home / ".erlang.cookie"
    if cookie.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)


def new_node(
    home: Path,
    name: str,
    *,
    port: int | None = None,
    dist_port: int | None = None,
    consumer_timeout_ms: int | None = None,
    config: Mapping[str, str] | None = None,
    seed: str | None = None,
) -> RabbitNode:
    """A node description (nothing started); ports default to free ones."""
    short = name if "@" in name else f"{name}@localhost"
    return RabbitNode(
        name=short,
        port=port or free_port(),
        dist_port=dist_port or free_port(),
        home=home,
        consumer_timeout_ms=consumer_timeout_ms,
        config=dict(config or {}),
        seed=seed,
    )
