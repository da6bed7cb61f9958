"""The soak's faults, drawn from a seeded RNG, and the once-a-second samples.

Faults come one at a time, exponentially spaced (mean `1 / rate`), their kinds
in shuffled rounds so that every kind comes up early even in a short run:

- ``redis_kill``: SIGKILL, down for 0-2 s, started again empty on the same port;
- ``redis_freeze``: SIGSTOP for 1-3 s (connections accepted, no replies), SIGCONT;
- ``script_flush``: ``SCRIPT FLUSH`` and ``FUNCTION FLUSH`` (as a failover does);
- ``worker_kill``: SIGKILL one of the app processes (its leases and queued
  entries stay behind in Redis), restarted on the same port after 0.5-3 s.

Client disconnects are not drawn here: the quitters (`bench.soakload`) leave
all the time. The blocking work (a restart waits for PING) runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.support.redis_server import RedisServer
from tests.support.servers import AppServer

KINDS = ("redis_kill", "redis_freeze", "script_flush", "worker_kill")


@dataclass
class Fault:
    """One fault; times are seconds since the soak started."""

    kind: str
    at_s: float
    #: When it was over: Redis answering again, the worker serving again.
    end_s: float
    detail: str
    #: The worker's base URL (worker_kill).
    target: str = ""


@dataclass
class Injector:
    server: RedisServer
    workers: list[AppServer]
    rng: random.Random
    #: Faults per second (mean).
    rate: float
    t0: float
    faults: list[Fault] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self, until_s: float) -> None:
        """Inject faults until `until_s` (none starts later; each is over before the next)."""
        kinds: list[str] = []
        while True:
            gap = max(1.0, self.rng.expovariate(self.rate))
            if self.now() + gap >= until_s:
                return
            await asyncio.sleep(gap)
            if not kinds:
                kinds = list(KINDS)
                self.rng.shuffle(kinds)
            kind = kinds.pop()
            at = self.now()
            detail, target = await asyncio.to_thread(self._inject, kind)
            self.faults.append(Fault(kind, at, self.now(), detail, target))

    def _inject(self, kind: str) -> tuple[str, str]:
        if kind == "redis_kill":
            down = self.rng.uniform(0.0, 2.0)
            self.server.kill()
            time.sleep(down)
            self.server.start()
            return f"down {down:.1f} s, back empty", ""
        if kind == "redis_freeze":
            frozen = self.rng.uniform(1.0, 3.0)
            self.server.freeze()
            time.sleep(frozen)
            self.server.thaw()
            return f"frozen {frozen:.1f} s", ""
        if kind == "script_flush":
            self.server.flush_scripts()
            return "scripts and functions flushed", ""
        if kind == "worker_kill":
            index = self.rng.randrange(len(self.workers))
            worker = self.workers[index]
            down = self.rng.uniform(0.5, 3.0)
            worker.kill()
            time.sleep(down)
            worker.start()
            return f"worker {index} killed, restarted after {down:.1f} s", worker.url
        raise ValueError(f"unknown fault {kind!r}")


def rss_kib(pid: int) -> int | None:
    """A process's resident set from procfs; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


@dataclass
class Sample:
    t_s: float
    #: Per worker: (pid, RSS KiB or None).
    workers: list[tuple[int, int | None]]
    redis_rss_kib: int | None
    load_rss_kib: int | None
    #: DBSIZE and INFO used_memory; None while Redis does not answer.
    keys: int | None
    redis_used_kib: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sampler:
    server: RedisServer
    workers: list[AppServer]
    t0: float
    samples: list[Sample] = field(default_factory=list)

    async def run(self, interval_s: float = 1.0) -> None:
        """Sample every `interval_s` until cancelled."""
        client = self.server.client(socket_timeout=0.3, socket_connect_timeout=0.3)
        try:
            while True:
                self.samples.append(await asyncio.to_thread(self.take, client))
                await asyncio.sleep(interval_s - (time.monotonic() - self.t0) % interval_s)
        finally:
            client.close()

    def take(self, client: redis.Redis) -> Sample:
        t = time.monotonic() - self.t0
        workers = []
        for worker in self.workers:
            pid = worker.pid if worker.is_running else 0
            workers.append((pid, rss_kib(pid) if pid else None))
        keys = used = None
        try:
            keys = int(client.dbsize())
            used = int(client.info("memory")["used_memory"]) // 1024
        except redis.RedisError:
            pass
        redis_rss = rss_kib(self.server.pid) if self.server.is_running else None
        return Sample(t, workers, redis_rss, rss_kib(os.getpid()), keys, used)
