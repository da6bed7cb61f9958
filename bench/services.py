"""External services a variant needs during a run: a private, pinned redis-server.

The runner starts each service the selected variants name once per run, gives
its environment only to the servers of variants that name it, calls ``reset``
before each trial and samples ``counters`` right before and right after each
measured load run. It records the deltas, and the deltas per completed
request, in the trial's results.

**Redis round trips, counted by the server.** Redis 7 counts the commands a
script runs like any other: in ``total_commands_processed`` and in each
``cmdstat_*`` (checked on 7.0.15: 10 EVALSHAs of a 3-command script add 40
commands), and ``CLIENT LIST`` has no per-client command count before 7.4. So
the commands a client sent cannot be told from the commands its scripts ran.
What can be: ``total_writes_processed`` in ``INFO stats``, which goes up by one
each time Redis writes replies to a client socket, that is once per request
/response exchange. A command run inside a script writes nothing to any
socket, a pipeline of N commands is one write (one round trip), a large command
read in several pieces is still one write, and a BLPOP counts once, when it
answers. So ``round_trips`` = writes; ``reads`` (``total_reads_processed``)
is a cross-check (it also counts closed connections and commands split over
several reads). Each sample is itself an INFO command (one read, one write,
one command): ``counters`` subtracts the samples taken so far. ``commands`` is
every command including those inside scripts, ``script_calls`` the calls of
EVAL/EVALSHA/FCALL (and their _RO forms), ``script_us`` the microseconds Redis
spent running them, ``cmd.<name>`` each command's calls,
``cpu_s`` the server's CPU seconds (from ``/proc``).

Where Redis runs: on the load generator's CPUs (``ServiceContext.cpus``), not
the server's. The server under test is one single-threaded worker that keeps
its core busy; Redis on that core would take CPU from the very process being
measured and charge a Redis-backed variant twice (its own work and Redis's).
In production Redis runs on other cores or hosts. wrk needs a fraction of its
core, so Redis has room next to it; ``cpu_s`` per trial shows how much it used.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .server import ROOT

if str(ROOT) not in sys.path:  # `tests.support` lives in the repository, not in the package
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class ServiceContext:
    #: CPUs to pin the service to (a ``taskset -c`` list), or None.
    cpus: str | None
    #: A scratch directory that lives as long as the run.
    workdir: Path


class Service(Protocol):
    def start(self) -> Mapping[str, str]:
        """Start the service; return variables for the server processes' environment."""

    def reset(self) -> None:
        """Forget the previous trial's state (called before every trial)."""

    def counters(self) -> Mapping[str, float]:
        """Cumulative counters, e.g. commands processed; cheap to sample."""

    def describe(self) -> Mapping[str, Any]:
        """What to record about the service (version, pinning)."""

    def stop(self) -> None:
        """Stop the service and its processes; safe to call after a failed start."""


ServiceFactory = Callable[[ServiceContext], Service]

_SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


class RedisService:
    """A redis-server of its own: no persistence, a reserved free port, pinned."""

    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self._server: Any = None
        self._client: Any = None
        self._samples = 0

    def start(self) -> Mapping[str, str]:
        from tests.support.redis_server import RedisServer

        self._server = server = RedisServer().start()
        if self.context.cpus is not None:
            # -a: every thread (Redis starts its background threads at boot).
            subprocess.run(
                ["taskset", "-a", "-p", "-c", self.context.cpus, str(server.pid)],
                check=True,
                capture_output=True,
                timeout=10,
            )
        self._client = server.client(socket_timeout=10.0, protocol=2)
        return {"THROTTLE_REDIS_URL": server.url, "BENCH_REDIS_URL": server.url}

    @property
    def url(self) -> str:
        return str(self._server.url)

    @property
    def pid(self) -> int:
        return int(self._server.pid)

    def reset(self) -> None:
        self._client.flushall()

    def counters(self) -> dict[str, float]:
        info = self._client.info("all")
        self._samples += 1
        own = self._samples - 1  # our earlier samples, as this one sees them
        calls = {
            key.removeprefix("cmdstat_"): float(value["calls"])
            for key, value in info.items()
            if key.startswith("cmdstat_")
        }
        calls["info"] = calls.get("info", 0.0) - own
        found = {
            "round_trips": float(info["total_writes_processed"]) - own,
            "reads": float(info["total_reads_processed"]) - own,
            "commands": float(info["total_commands_processed"]) - own,
            "script_calls": sum(calls.get(name, 0.0) for name in _SCRIPT_COMMANDS),
            # Time Redis spent running scripts (their commands included), microseconds.
            "script_us": sum(
                float(info.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in _SCRIPT_COMMANDS
            ),
            "connections": float(info["total_connections_received"]),
            **{f"cmd.{name}": value for name, value in calls.items()},
        }
        cpu = _cpu_s(self.pid)
        if cpu is not None:
            found["cpu_s"] = cpu
        return found

    def describe(self) -> dict[str, Any]:
        from tests.support.redis_server import redis_version

        return {
            "binary": str(self._server.binary),
            "version": ".".join(map(str, redis_version(self._server.binary))),
            "cpus": self.context.cpus,
        }

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.close()
            self._server = None


def _cpu_s(pid: int) -> float | None:
    from .server import Server

    return Server("", pid).cpu_s()


#: Service name -> factory. Variants name their services in ``services=(...)``.
SERVICES: dict[str, ServiceFactory] = {"redis": RedisService}


class Running:
    """The services of one run: each one's environment, reset and sampled together."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.envs: dict[str, dict[str, str]] = {}

    def env_for(self, names: Sequence[str]) -> dict[str, str]:
        """The environment of the services `names` (a variant gets only its own)."""
        merged: dict[str, str] = {}
        for name in names:
            merged.update(self.envs[name])
        return merged

    def reset(self) -> None:
        for service in self.services.values():
            service.reset()

    def sample(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """The counters of the services `names` (default: all), keyed ``<service>.<counter>``."""
        return {
            f"{name}.{key}": value
            for name, service in self.services.items()
            if names is None or name in names
            for key, value in service.counters().items()
        }

    def describe(self) -> dict[str, Any]:
        return {name: dict(service.describe()) for name, service in self.services.items()}


@contextmanager
def running(names: Sequence[str], context: ServiceContext) -> Iterator[Running]:
    """Start each named service once; stop them all on exit, whatever happens."""
    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise LookupError(f"benchmark services not implemented: {', '.join(unknown)}")
    run = Running()
    with ExitStack() as stack:
        for name in dict.fromkeys(names):
            service = SERVICES[name](context)
            stack.callback(service.stop)
            run.envs[name] = dict(service.start())
            run.services[name] = service
        yield run
