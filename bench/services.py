"""External services a variant needs during a run (none yet; Redis is next).

The runner starts each service a selected variant names once per run, passes
the environment it returns to every server process, calls ``reset`` before
each trial and samples ``counters`` right before and right after each measured
load run. It records the deltas, and the deltas per completed request, in the
trial's results: that is how Redis round trips per request will be counted.

To add one (e.g. ``"redis"``), register a factory in `SERVICES` that returns a
`Service`. For Redis: start a dedicated ``redis-server`` (``--save ''
--appendonly no``, a free port, pinned with ``taskset`` next to the server),
return ``{"THROTTLE_REDIS_URL": ..., "BENCH_REDIS_URL": ...}`` from ``start``,
``FLUSHALL`` in ``reset``, and read ``total_commands_processed`` from
``INFO stats`` and the ``calls`` of each ``cmdstat_*`` from ``INFO
commandstats`` in ``counters`` (each sample is itself one command: subtract it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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

    def stop(self) -> None:
        """Stop the service and its processes; safe to call after a failed start."""


ServiceFactory = Callable[[ServiceContext], Service]

#: Service name -> factory. Variants name their services in ``services=(...)``.
SERVICES: dict[str, ServiceFactory] = {}


class Running:
    """The services of one run: their merged environment, reset and sampled together."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.env: dict[str, str] = {}

    def reset(self) -> None:
        for service in self.services.values():
            service.reset()

    def sample(self) -> dict[str, float]:
        """Every service's counters, keyed ``<service>.<counter>``."""
        return {
            f"{name}.{key}": value
            for name, service in self.services.items()
            for key, value in service.counters().items()
        }


@contextmanager
def running(names: Sequence[str], context: ServiceContext) -> Iterator[Running]:
    """Start each named service once; stop them all on exit, whatever happens."""
    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise LookupError(f"benchmark services not implemented yet: {', '.join(unknown)}")
    run = Running()
    with ExitStack() as stack:
        for name in dict.fromkeys(names):
            service = SERVICES[name](context)
            stack.callback(service.stop)
            run.env.update(service.start())
            run.services[name] = service
        yield run
